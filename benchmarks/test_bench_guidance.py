"""Smoke test of benchmarks/bench_guidance.py (CI: `pytest benchmarks --benchmark-disable`; it is also the GPU
suite's dry run): every variant runs and is timed, with speedups against the naive loop and the best plain one.
(The plain guided loop's correctness: tests/bench/test_baseline.py, against the exact guided law.)"""
import json

import torch


def test_bench_guidance_smoke(tmp_path, capsys, bench_script):
    threads = torch.get_num_threads()
    try:
        bench = bench_script("bench_guidance")
        assert bench.main(["--quick", "--threads", "1", "--allow-dirty", "--json", str(tmp_path / "g.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "g.json").read_text())
    rows = doc["rows"]
    assert [r["variant"] for r in rows] == ["plain, two calls", "plain, one 2B call", "ddpm_fast guided",
                                           "ddpm_fast, w = 1"]
    assert all(r["min_s"] <= r["median_s"] <= r["max_s"] and r["vs_naive"] > 0 for r in rows)
    assert rows[0]["vs_naive"] == 1.0 and doc["guidance_scale"] == 3.0 and doc["meta"]["git_commit"]
    assert "Guided sampling (w = 3)" in capsys.readouterr().out
