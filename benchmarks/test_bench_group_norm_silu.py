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


def test_comparison_script_quick(tmp_path, bench_script):
    """benchmarks/bench_group_norm_silu.py --quick runs end to end (both layouts, threads 1 and 2) and records what
    a reader needs: the commit, the load, each side's thread count, geometric means per layout and pass."""
    import json
    script = bench_script("bench_group_norm_silu")
    out = tmp_path / "gns.json"
    script.main(["--quick", "--repeats", "1", "--allow-dirty", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["meta"]["git_commit"] and d["meta"]["load_average_end"] is not None
    assert {r["layout"] for r in d["rows"]} == {"nchw", "channels_last"}
    assert all(r["torch_threads"] in (1, 2) and r["fused_threads"] in (1, 2) for r in d["rows"])
    assert {"nchw forward", "channels_last backward", "both forward"} <= set(d["summary"])
    assert all(r["copy_pct_of_copy"] == pytest.approx(100) and r["fused_pct_of_copy"] > 0 for r in d["rows"])
    for r in d["rows"]:  # every variant is reported at its best thread count
        for name in ("torch", "fused", "copy"):
            assert r[f"{name}_ms"] == min(r[f"{name}_ms_by_threads"].values())
    assert "dirty" in d["meta"] and d["meta"]["allow_dirty"]
