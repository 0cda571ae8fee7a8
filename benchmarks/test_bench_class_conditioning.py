"""Smoke test of benchmarks/bench_class_conditioning.py (CI: `pytest benchmarks --benchmark-disable`): the dry run
writes its JSON with every variant timed, and the variants compute the same projections."""
import json

import torch


def test_bench_class_conditioning_smoke(tmp_path, capsys, bench_script):
    threads = torch.get_num_threads()
    try:
        bench = bench_script("bench_class_conditioning")
        assert bench.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("*-quick.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["variant"] for r in rows} >= {"U-Net forward", "naive", "split", "split, one matmul", "table"}
    assert all(r["min_us"] <= r["us"] <= r["max_us"] and r["us"] > 0 for r in rows)
    assert "Class conditioning per step" in capsys.readouterr().out


def test_variants_agree(bench_script):
    """Every way of getting a step's projections gives the numbers forward would use."""
    from ddpm_fast.models import UNet
    bench = bench_script("bench_class_conditioning")
    torch.manual_seed(0)
    model = UNet.preset("tiny", num_classes=4).eval()
    with torch.inference_mode():
        fns, _ = bench.variants(model, 6, 10, torch.device("cpu"))
        expected = fns["naive"][0]()
        for name in ("split", "split, one matmul", "table"):
            torch.testing.assert_close(fns[name][0](), expected, rtol=1e-5, atol=1e-6)
