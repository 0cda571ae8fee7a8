"""Smoke test of benchmarks/bench_threads.py (the measurement behind threads "auto"): one quick round runs."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_threads  # noqa: E402


def test_quick_round_writes_a_result(tmp_path, capsys):
    bench_threads.main(["--quick", "--cases", "bundled-8x8-n64", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("threads-cpu-*-quick.json")
    result = json.loads(path.read_text())
    case = result["cases"]["bundled-8x8-n64"]
    import ddpm_fast
    params = sum(p.numel() for p in ddpm_fast.load().parameters())
    assert case["work"] == params * 8 * 8 * 64 and set(case["timings"]) == {"set_num_threads", "OMP_NUM_THREADS"}
    assert all(len(v) == 1 for mode in case["timings"].values() for v in mode.values())
    assert "bundled-8x8-n64" in capsys.readouterr().out
