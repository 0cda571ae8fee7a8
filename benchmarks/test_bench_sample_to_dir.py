"""Smoke test of benchmarks/bench_sample_to_dir.py (CI: `pytest benchmarks --benchmark-disable`): both modes run
end to end with tiny settings and write their JSON, so the harness cannot rot."""
import json


def test_batches_mode_dry_run(tmp_path, capsys, bench_script):
    bench = bench_script("bench_sample_to_dir")
    assert bench.main(["--mode", "batches", "--device", "cpu", "--quick", "--threads", "1", "--allow-dirty",
                       "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("sample_to_dir-*-quick.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["batch"] for r in rows] == [2, 4] and all(r["images_per_s"] > 0 for r in rows)
    assert "best batch size" in capsys.readouterr().out


def test_processes_mode_dry_run(tmp_path, capsys, bench_script):
    assert bench_script("bench_sample_to_dir").main(["--quick", "--allow-dirty", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("sample_to_dir-*-quick.json")
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"1 process x 1 thread", "2 processes x 1 thread"}
    assert rows["2 processes x 1 thread"]["same_arr_0_as_1x1"] and rows["1 process x 1 thread"]["speedup"] == 1.0
    assert "| 2 processes x 1 thread |" in capsys.readouterr().out
