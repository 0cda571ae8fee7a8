"""Fused GroupNorm+SiLU: every backend against the float64 reference, on random data with fresh seeds, under the
error rule of tests/group_norm_silu_rule.py. The CPU kernels path by path (AVX2 and portable, threads, tails):
test_group_norm_silu_cpu.py."""
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.ops import _ext
from ddpm_fast.ops import group_norm_silu as gns
from ddpm_fast.ops.common import prepare_layout
from ddpm_fast.ops.group_norm_silu import GroupNormSiLU, group_norm_silu, group_norm_silu_ref
from group_norm_silu_rule import ATOL, affine, assert_rule, check_grads, make_x, naive, ref64

HAS_CPP = _ext.has_cpu_kernels()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="ddpm_fast._C not built")

# (shape, groups): odd sizes, 2-D/3-D/4-D/5-D, and the U-Net's (C/G = 4..16) group shapes in miniature.
SHAPES = [((3, 96, 7, 9), 8), ((2, 64, 4, 4), 32), ((2, 12, 5), 3), ((4, 6), 2), ((1, 16, 2, 3, 5), 4)]
LAYOUTS = ["nchw", "channels_last", "sliced", "sliced_channels_last"]


# ----------------------------------------------------------------------------- forward, every backend
def backends(device="cpu"):
    out = [("ref", gns._fwd_ref, gns._bwd_ref, list(ATOL))]
    if HAS_CPP and device == "cpu":
        out.append(("cpp", gns._fwd_cpp, gns._bwd_cpp, [torch.float32, torch.bfloat16, torch.float64]))
    return out


@pytest.mark.parametrize("shape,G", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_forward_backward_cpu(seed, shape, G, layout, dtype):
    x = make_x(shape, layout, dtype)
    w, b = affine(shape[1])
    ref = ref64(x, G, w, b)
    low = naive(x, G, w, b)
    dy = torch.randn(shape).to(dtype)
    for name, fwd, bwd, dtypes in backends():
        if dtype not in dtypes:
            continue
        y, mean, rstd = fwd(x, w, b, G, 1e-5)
        assert y.dtype == dtype and y.shape == x.shape, name
        assert mean.shape == (shape[0], G) and mean.dtype == gns._stats_dtype(x), name
        assert_rule(y, ref, low, ATOL[dtype])
        # mean/rstd against float64 statistics
        xs = x.double().reshape(shape[0], G, -1)
        torch.testing.assert_close(mean.double(), xs.mean(-1), atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(rstd.double(), torch.rsqrt(xs.var(-1, unbiased=False) + 1e-5), atol=1e-5,
                                   rtol=2e-3 if dtype != torch.float64 else 1e-9)
        dx, dw, db = bwd(dy, x, w, b, mean, rstd, G)
        check_grads(x, w, b, G, dy, dx, dw, db, name)


@needs_cpp
@pytest.mark.skipif(not getattr(_ext.load(), "with_openmp", False), reason="the extension was built without OpenMP")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_on_two_threads(seed, layout, dtype):
    """The C++ kernels use a second thread only above 16384 elements per thread (use_threads): at
    4 x 64 x 17 x 19 = 82688 elements, 128 groups, 2 threads run forward and backward; the results obey the error
    rule; in NCHW they equal the 1-thread results bitwise (per-group work and fixed-order reductions)."""
    shape, G = (4, 64, 17, 19), 32
    x = make_x(shape, layout, dtype)
    w, b = affine(shape[1])
    dy = torch.randn(shape).to(dtype)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mean, rstd = gns._fwd_cpp(x, w, b, G, 1e-5)
            runs.append((y, mean, rstd, *gns._bwd_cpp(dy, x, w, b, mean, rstd, G)))
    finally:
        torch.set_num_threads(threads)
    if layout == "nchw":  # one task per (sample, group): the thread count cannot change a bit
        for one, two in zip(*runs):
            torch.testing.assert_close(one, two, rtol=0, atol=0)
    # channels_last splits a sample's rows over the threads, so its sums (and last bits) follow the thread count
    for n, (y, mean, rstd, dx, dw, db) in zip((1, 2), runs):
        assert_rule(y, ref64(x, G, w, b), naive(x, G, w, b), ATOL[dtype])
        check_grads(x, w, b, G, dy, dx, dw, db, f"cpp {n} thread(s) {layout}")


@needs_cpp
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("affine_params", [True, False])
def test_gradcheck_float64(seed, layout, affine_params):
    x = make_x((2, 6, 3, 5), layout, torch.float64).requires_grad_()
    w, b = affine(6, torch.float64) if affine_params else (None, None)
    inputs = (x, w, b) if affine_params else (x,)
    for fast in (True, False):  # the eager fast path and the torch.library op
        gns._EAGER_FAST_PATH = fast
        try:
            assert torch.autograd.gradcheck(lambda *a: group_norm_silu(a[0], 3, *a[1:]), inputs)
        finally:
            gns._EAGER_FAST_PATH = True


def test_bwd_ref_is_autograd_of_spec(seed):
    x = make_x((3, 12, 4, 5), "nchw", torch.float64)
    w, b = affine(12, torch.float64)
    y, mean, rstd = gns._fwd_ref(x, w, b, 4, 1e-5)
    dy = torch.randn_like(y)
    dx, dw, db = gns._bwd_ref(dy, x, w, b, mean, rstd, 4)
    xr = x.clone().requires_grad_()
    gx, gw, gb = torch.autograd.grad(group_norm_silu_ref(xr, 4, w, b), (xr, w, b), dy)
    for a, r in ((dx, gx), (dw, gw), (db, gb)):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-9)


# ----------------------------------------------------------------------------- the public op and module
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16 on the CPU: the reference
def test_public_op(seed, fast, layout, dtype, monkeypatch):
    monkeypatch.setattr(gns, "_EAGER_FAST_PATH", fast)
    x = make_x((3, 96, 7, 9), layout, dtype).requires_grad_()
    w, b = affine(96)
    y = group_norm_silu(x, 8, w, b)
    assert y.dtype == dtype
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rule(y, ref64(x, 8, w, b), naive(x.detach(), 8, w, b), ATOL[dtype])
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    check_grads(x, w, b, 8, dy, dx, dw, db, "public")
    # weight/bias absent, and only some inputs requiring grad
    y2 = group_norm_silu(x, 8)
    (gx,) = torch.autograd.grad(y2.sum(), (x,))
    assert gx.shape == x.shape and torch.isfinite(gx).all()


def test_module_state_dict_matches_group_norm(seed):
    ref = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    fused = GroupNormSiLU(8, 32)
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    back = torch.nn.GroupNorm(8, 32)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)
    x = torch.randn(2, 32, 5, 5)
    assert_rule(fused(x), ref64(x, 8, ref.weight, ref.bias), F.silu(ref(x)), ATOL[torch.float32])


@pytest.mark.parametrize("shape,G", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS + ["misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("affine_params", [True, False])
def test_module_inference_fast_path(seed, shape, G, layout, dtype, affine_params, monkeypatch):
    """GroupNormSiLU under no_grad / inference_mode on the CPU goes straight to the kernel for dense 4-D inputs
    (and falls back to the general path otherwise): the same rule against the specification either way, and
    bitwise the general path's result where both run the C++ kernel."""
    calls = []
    real = gns._fwd_cpu_inference
    monkeypatch.setattr(gns, "_fwd_cpu_inference", lambda *a: calls.append(real(*a)) or calls[-1])
    C = shape[1]
    mod = GroupNormSiLU(G, C, affine=affine_params).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if affine_params:
        with torch.no_grad():
            mod.weight.normal_(1, 0.5), mod.bias.normal_(0, 0.5)
    x = make_x(shape, layout, dtype)
    w, b = (mod.weight, mod.bias) if affine_params else (None, None)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = mod(x)
        assert y.shape == x.shape and y.dtype == dtype
        if layout in ("nchw", "misaligned"):
            assert y.is_contiguous()
        assert_rule(y, ref64(x, G, w, b), naive(x, G, w, b), ATOL[dtype])
    dense4d = len(shape) == 4 and layout in ("nchw", "channels_last", "misaligned") and dtype != torch.float16
    took_fast = any(c is not None for c in calls)
    assert took_fast == (dense4d and HAS_CPP), (calls, layout, dtype)
    if took_fast:  # the fast path is the general path's kernel, called directly
        assert torch.equal(y, group_norm_silu(x, G, w, b, mod.eps))
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


@needs_cpp
def test_module_inference_fast_path_defers_errors():
    """Inputs the fast path does not take still get the general path's clear errors."""
    mod = GroupNormSiLU(4, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="divisible"):
            mod(torch.randn(2, 6, 3, 3))
        with pytest.raises(ValueError, match="shape"):
            GroupNormSiLU(2, 6)(torch.randn(2, 8, 3, 3))   # weight (6,) vs C = 8
        with pytest.raises(TypeError, match="floating"):
            mod(torch.ones(2, 8, 3, 3, dtype=torch.int64))
        assert mod(torch.randn(0, 8, 3, 3)).shape == (0, 8, 3, 3)


def test_autocast_bf16_input_fp32_params(seed):
    m = GroupNormSiLU(8, 64)
    with torch.no_grad():
        m.weight.normal_(), m.bias.normal_()
    x = make_x((2, 64, 6, 6), "channels_last", torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert_rule(y, ref64(x, 8, m.weight, m.bias), naive(x.detach(), 8, m.weight, m.bias), ATOL[torch.bfloat16])
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and m.weight.grad.dtype == torch.float32


def test_opcheck(seed):
    for layout in ("nchw", "channels_last"):
        x = make_x((2, 16, 3, 5), layout, torch.float32).requires_grad_()
        w, b = affine(16)
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, w, b, 4, 1e-5))
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu.default, (x, None, None, 4, 1e-5))
        y, mean, rstd = torch.ops.ddpm_fast.group_norm_silu(x, w, b, 4, 1e-5)
        args = (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, 4)
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm_silu_backward.default, args)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.norm = GroupNormSiLU(4, 16)

    def forward(self, x):
        return self.norm(self.conv(x)) + x


def test_torch_compile_module(seed):
    torch._dynamo.reset()
    block = _Block()
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_ref = block(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(y.sum(), (x, block.norm.weight))
    g_ref = torch.autograd.grad(y_ref.sum(), (x, block.norm.weight))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


@needs_cpp
def test_cpu_deterministic_and_thread_counts(seed):
    x = make_x((4, 64, 9, 9), "channels_last", torch.float32)
    w, b = affine(64)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            y, mean, rstd = gns._fwd_cpp(x, w, b, 16, 1e-5)
            outs.append((y, *gns._bwd_cpp(torch.ones_like(y), x, w, b, mean, rstd, 16)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[2]))  # same threads: bitwise identical
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_cpp
def test_large_mean_small_spread(seed):
    """Shifted sums: fp32 statistics stay accurate when |mean| >> std."""
    x = make_x((2, 32, 8, 8), "nchw", torch.float32, scale=0.01, offset=300.0)
    w, b = affine(32)
    y, _, _ = gns._fwd_cpp(x, w, b, 8, 1e-5)
    assert_rule(y, ref64(x, 8, w, b), naive(x, 8, w, b), 1e-5)


# ----------------------------------------------------------------------------- bad input and edge cases
@pytest.mark.parametrize("fast", [True, False])
def test_bad_inputs(fast, monkeypatch):
    monkeypatch.setattr(gns, "_EAGER_FAST_PATH", fast)
    x = torch.randn(2, 12, 3, 3)
    cases = [
        ((x, 5), ValueError, "divisible"),
        ((x, 4, torch.ones(11)), ValueError, "weight must have shape"),
        ((x, 4, None, torch.ones(12, 1)), ValueError, "bias must have shape"),
        ((x, 4, torch.ones(12, device="meta")), ValueError, "weight is on"),
        ((x.int(), 4), TypeError, "floating-point"),
        ((x.to(torch.complex64), 4), TypeError, "floating-point"),
        ((torch.randn(12), 4), ValueError, r"shape \(N, C, \*\)"),
        ((x, 4, torch.ones(12, dtype=torch.int64)), TypeError, "floating point"),
        ((x, 4, None, None, -1.0), ValueError, "eps"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            group_norm_silu(*args)


def test_empty_batch(seed):
    x = torch.randn(0, 16, 4, 4, requires_grad=True)
    w, b = affine(16)
    y = group_norm_silu(x, 4, w, b)
    assert y.shape == x.shape
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True)
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(16)) and torch.equal(gb, torch.zeros(16))


@needs_cpp
def test_cpp_checks_sizes():
    C = _ext.load()
    t = torch.randn(2, 8, 4)
    ptrs = (t.data_ptr(), 0, 0, t.data_ptr(), t.data_ptr(), t.data_ptr())
    with pytest.raises(ValueError, match="not divisible"):
        C.group_norm_silu_fwd_cpu(*ptrs, 2, 8, 4, 3, 1e-5, 0, 0, 1)
    with pytest.raises(ValueError, match="N and HW"):
        C.group_norm_silu_fwd_cpu(*ptrs, -1, 8, 4, 2, 1e-5, 0, 0, 1)
    with pytest.raises(ValueError, match="dtype code"):
        C.group_norm_silu_fwd_cpu(*ptrs, 2, 8, 4, 2, 1e-5, 7, 0, 1)
    with pytest.raises(ValueError, match="float16"):
        C.group_norm_silu_fwd_cpu(*ptrs, 2, 8, 4, 2, 1e-5, 1, 0, 1)
    with pytest.raises(ValueError, match="null"):
        C.group_norm_silu_fwd_cpu(0, 0, 0, 0, 0, 0, 2, 8, 4, 2, 1e-5, 0, 0, 1)
    with pytest.raises(ValueError, match="num_threads"):
        C.group_norm_silu_fwd_cpu(*ptrs, 2, 8, 4, 2, 1e-5, 0, 0, 0)


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)
@pytest.mark.triton_cpu  # the Triton interpreter on CPU tensors (conftest.py)
@pytest.mark.parametrize("shape,G,layout,dtype", [  # small: the interpreter runs each program in numpy
    ((2, 24, 5, 7), 2, "nchw", torch.float32),
    ((2, 24, 5, 7), 2, "sliced_channels_last", torch.bfloat16),
    ((2, 12, 5), 3, "channels_last", torch.float16),
])
def test_triton_kernels(seed, shape, G, layout, dtype, monkeypatch):
    from ddpm_fast.ops.triton import group_norm_silu as tk
    x = make_x(shape, layout, dtype)
    w, b = affine(shape[1])
    dy = torch.randn(shape).to(dtype)
    for tile in (tk._MAX_TILE, 64):  # whole group in one tile, and the looped two-pass path
        monkeypatch.setattr(tk, "_MAX_TILE", tile)
        y, mean, rstd = tk._group_norm_silu_fwd(x, w, b, G, 1e-5)
        assert y.stride() == prepare_layout(x)[0].stride()
        assert_rule(y, ref64(x, G, w, b), naive(x, G, w, b), ATOL[dtype])
        dx, dw, db = tk._group_norm_silu_bwd(dy, x, w, b, mean, rstd, G)
        check_grads(x, w, b, G, dy, dx, dw, db, f"triton tile={tile}")


# ----------------------------------------------------------------------------- GPU (skipped without CUDA)
DDPM_SHAPES = [((4, 128, 32, 32), 32), ((4, 256, 16, 16), 32), ((4, 384, 8, 8), 32), ((4, 512, 4, 4), 32),
               ((2, 128, 32, 32), 8), ((2, 64, 64, 64), 1), ((3, 96, 7, 9), 8), ((2, 12, 5), 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,G", DDPM_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels(seed, shape, G, layout, dtype):
    if not _ext.has_cuda_kernels():
        pytest.skip("ddpm_fast._C built without CUDA")
    x = make_x(shape, layout, dtype, device="cuda")
    w, b = affine(shape[1], device="cuda")
    dy = torch.randn(shape, device="cuda").to(dtype)
    if layout == "misaligned":
        assert x.data_ptr() % 16 != 0  # the kernels must take their unvectorized path
        dy = torch.empty(dy.numel() + 1, dtype=dtype, device="cuda")[1:].view(shape).copy_(dy)
    y, mean, rstd = gns._fwd_cpp(x, w, b, G, 1e-5)
    assert_rule(y, ref64(x, G, w, b), naive(x, G, w, b), ATOL[dtype])
    dx, dw, db = gns._bwd_cpp(dy, x, w, b, mean, rstd, G)
    check_grads(x, w, b, G, dy, dx, dw, db, "cuda")
    dx2, dw2, db2 = gns._bwd_cpp(dy, x, w, b, mean, rstd, G)
    assert torch.equal(dw, dw2) and torch.equal(db, db2)  # no atomics: deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_triton_kernels(seed, layout, dtype):
    """The compiled Triton kernels (approximate exp and division in the SiLU: bounded here on the GPU path)."""
    from ddpm_fast.ops.triton import group_norm_silu as tk
    x = make_x((2, 128, 16, 16), layout, dtype, device="cuda")
    w, b = affine(128, device="cuda")
    dy = torch.randn_like(x)
    y, mean, rstd = tk._group_norm_silu_fwd(x, w, b, 32, 1e-5)
    assert_rule(y, ref64(x, 32, w, b), naive(x, 32, w, b), ATOL[dtype])
    dx, dw, db = tk._group_norm_silu_bwd(dy, x, w, b, mean, rstd, 32)
    check_grads(x, w, b, 32, dy, dx, dw, db, "triton cuda")


@pytest.mark.gpu
def test_cuda_graph_capture_and_compile(seed):
    block = _Block().cuda()
    x = torch.randn(4, 16, 8, 8, device="cuda", requires_grad=True)
    static_x = x.detach().clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (allocations, autotuning) outside the capture
            block(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = block(static_x)
        static_y.sum().backward()
    static_x.grad = None
    new_x = torch.randn_like(x)
    static_x.data.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_y, block(new_x), atol=1e-4, rtol=1e-4)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(new_x), block(new_x), atol=1e-4, rtol=1e-4)
