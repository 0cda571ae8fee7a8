"""pytest-benchmark suite for the fused GroupNorm+SiLU (CI runs it once with --benchmark-disable so it cannot rot).

    pytest benchmarks/test_bench_group_norm_silu.py --benchmark-only      # timed, on this machine
Comparison tables with interleaved variants and bandwidth: benchmarks/bench_group_norm_silu.py.
"""
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.ops.group_norm_silu import group_norm_silu

# Two DDPM CIFAR-10 U-Net sites (batch 8): the largest spatial size and the smallest.
SHAPES = {"128x32x32": (8, 128, 32, 32), "512x4x4": (8, 512, 4, 4)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _inputs(shape, device, channels_last=False):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device=device).requires_grad_()
    b = torch.randn(shape[1], device=device).requires_grad_()
    return x.requires_grad_(), w, b


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, fn, device):
    def run():
        out = fn()
        _sync(device)
        return out
    return benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_forward(benchmark, impl, shape, device):
    x, w, b = _inputs(SHAPES[shape], device)
    xd = x.detach()
    fn = (lambda: F.silu(F.group_norm(xd, 32, w, b))) if impl == "torch" else (lambda: group_norm_silu(xd, 32, w, b))
    y = _bench(benchmark, fn, device)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_backward(benchmark, impl, shape, device):
    x, w, b = _inputs(SHAPES[shape], device)
    y = F.silu(F.group_norm(x, 32, w, b)) if impl == "torch" else group_norm_silu(x, 32, w, b)
    dy = torch.randn_like(y)
    dx, dw, db = _bench(benchmark, lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True), device)
    assert dx.shape == x.shape and dw.shape == db.shape == w.shape


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_forward_channels_last(benchmark, impl):
    x, w, b = _inputs(SHAPES["128x32x32"], "cpu", channels_last=True)
    xd = x.detach()
    fn = (lambda: F.silu(F.group_norm(xd, 32, w, b))) if impl == "torch" else (lambda: group_norm_silu(xd, 32, w, b))
    y = _bench(benchmark, fn, "cpu")
    assert y.shape == x.shape


def test_comparison_script_reports_every_variant_at_its_best_thread_count(tmp_path):
    """bench_group_norm_silu.py times every variant at each thread count, interleaved; each row names each
    variant's best count, the speedup at the main count and best vs best, and bandwidth as % of the copy's."""
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_group_norm_silu.py")
    spec = importlib.util.spec_from_file_location("_bench_gns", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        module.main(["--quick", "--thread-counts", "1,2", "--shapes", "256:16", "--burst", "1", "--allow-dirty",
                     "--json", str(tmp_path / "gn.json")])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "gn.json").read_text())
    assert result["meta"]["thread_counts"] == [1, 2] and result["meta"]["git_commit"]
    for row in result["rows"]:
        assert set(row["by_threads"]) == {"1", "2"} and row["main_threads"] == 2
        for name in ("torch", "fused", "copy"):
            best = row["best"][name]
            assert best["ms"] == min(row["by_threads"][t][name]["ms"] for t in ("1", "2"))
            assert row["by_threads"][str(best["threads"])][name]["ms"] == best["ms"]
        assert row["speedup_best_vs_best"] == pytest.approx(row["best"]["torch"]["ms"] / row["best"]["fused"]["ms"])
        assert row["by_threads"]["2"]["copy"]["pct_of_copy"] == pytest.approx(100)
    assert {"forward", "backward"} == set(result["summary"])
    assert result["summary"]["backward"]["unet"]["torch"]["best_threads"] in (1, 2)
