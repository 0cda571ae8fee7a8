"""Smoke test of benchmarks/bench_class_conditioning.py (CI: `pytest benchmarks --benchmark-disable`): the dry run
writes its JSON with every variant timed, and the variants compute the same projections."""
import importlib.util
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _script():
    spec = importlib.util.spec_from_file_location("_bench_class_conditioning",
                                                  os.path.join(HERE, "bench_class_conditioning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_class_conditioning_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert _script().main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("*-quick.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["variant"] for r in rows} >= {"U-Net forward", "naive", "split", "split, one matmul", "table"}
    assert all(r["min_us"] <= r["us"] <= r["max_us"] and r["us"] > 0 for r in rows)
    assert "Class conditioning per step" in capsys.readouterr().out


def test_variants_agree():
    """Every way of getting a step's projections gives the numbers forward would use."""
    from ddpm_fast.models import UNet
    bench = _script()
    torch.manual_seed(0)
    model = UNet.preset("tiny", num_classes=4).eval()
    with torch.inference_mode():
        fns, _ = bench.variants(model, 6, 10, torch.device("cpu"))
        expected = fns["naive"][0]()
        for name in ("split", "split, one matmul", "table"):
            torch.testing.assert_close(fns[name][0](), expected, rtol=1e-5, atol=1e-6)
