"""The CPU GroupNorm+SiLU kernels path by path: the AVX2 kernels and the portable ones (forced with
_C.group_norm_silu_cpu_isa), both layouts, every CPU dtype, the tails of every vector loop, and tensors large
enough that OpenMP splits the work over two threads -- each against the float64 specification with the error
rule of tests/group_norm_silu_rule.py. Also the lean inference path of the public function."""
import math

import pytest
import torch

from ddpm_fast.ops import _ext
from ddpm_fast.ops import group_norm_silu as gns
from ddpm_fast.ops.group_norm_silu import group_norm_silu
from group_norm_silu_rule import ATOL, affine, assert_rule, check_grads, make_x, naive, ref64

EXT = _ext.load() if _ext.has_cpu_kernels() else None
pytestmark = pytest.mark.skipif(EXT is None, reason="ddpm_fast._C not built")
BEST = EXT.group_norm_silu_cpu_isa() if EXT is not None else "portable"  # what this CPU runs by default
ISAS = ["portable", "avx2", "avx512"][: ["portable", "avx2", "avx512"].index(BEST) + 1]  # every path it can run
DTYPES = [torch.float32, torch.bfloat16, torch.float64]

# (shape, groups) whose sizes reach the tail of every loop: HW % 8 (NCHW channel tails), D*HW % 32 (the 32-wide
# statistics loop), C % 8 and C % 32 (NHWC channel blocks: 96 = 64 + 32, 12 = 8 + 4, 6 = a partial vector only),
# D % 4 (the NCHW backward takes channels 4 at a time when HW fills whole vectors: 6 = 4 + 2).
TAIL_SHAPES = [((2, 96, 7, 9), 8), ((3, 12, 5, 3), 3), ((2, 6, 4, 4), 2), ((2, 40, 1, 1), 4), ((2, 36, 4, 4), 6)]
# >= 2 * 16384 elements, so two threads each get work; groups past one cache block (64 KB) and past the fp32
# accumulators' flush length (512 elements, 16 rows); HW = 255 and 1024 for both channel-loop shapes. NHWC:
# the first two split each sample into row blocks, the last (8 samples of 8x8) gives each thread whole samples.
BIG_SHAPES = [((4, 96, 15, 17), 8), ((2, 128, 32, 32), 32), ((8, 64, 8, 8), 16)]


@pytest.fixture(params=ISAS)
def isa(request):
    """Selects the kernels for one test and restores the default after it."""
    assert EXT.group_norm_silu_cpu_isa(request.param) == request.param
    yield request.param
    EXT.group_norm_silu_cpu_isa("auto")


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _run_and_check(shape, G, layout, dtype, affine_params=True):
    """Forward and backward of the C++ kernels against the specification (error rule) for one case."""
    x = make_x(shape, layout, dtype)
    w, b = affine(shape[1], torch.float64 if dtype == torch.float64 else torch.float32)
    y, mean, rstd = gns._fwd_cpp(x, w if affine_params else None, b if affine_params else None, G, 1e-5)
    wr, br = (w, b) if affine_params else (None, None)
    assert_rule(y, ref64(x, G, wr, br), naive(x, G, wr, br), ATOL[dtype])
    xs = x.double().reshape(shape[0], G, -1)
    torch.testing.assert_close(mean.double(), xs.mean(-1), atol=1e-5, rtol=1e-4)
    dy = torch.randn(shape).to(dtype)
    dx, dw, db = gns._bwd_cpp(dy, x, w, b, mean, rstd, G)
    check_grads(x, w, b, G, dy, dx, dw, db, f"{layout} {dtype}")
    return y, dx, dw, db


@pytest.mark.parametrize("shape,G", TAIL_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tails(seed, isa, shape, G, layout, dtype):
    _run_and_check(shape, G, layout, dtype)


@pytest.mark.parametrize("shape,G", BIG_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_and_blocks(seed, isa, threads, shape, G, layout, dtype):
    assert math.prod(shape) >= 2 * 16384  # the kernels' threshold for a second thread
    _run_and_check(shape, G, layout, dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_no_affine_and_extreme_inputs(seed, isa, layout):
    """No weight/bias; pre-activations far past the exp's clamps (|z| > 88) and large means (shifted sums)."""
    _run_and_check((2, 16, 6, 6), 4, layout, torch.float32, affine_params=False)
    x = make_x((2, 64, 8, 8), layout, torch.float32, scale=3.0, offset=200.0)
    w = torch.full((64,), 40.0)  # z = 40 * xhat reaches about +-150
    b = torch.randn(64)
    y, _, _ = gns._fwd_cpp(x, w, b, 8, 1e-5)
    assert_rule(y, ref64(x, 8, w, b), naive(x, 8, w, b), ATOL[torch.float32])
    x[0, 0, 0, 0] = float("nan")  # a NaN poisons its group only
    y, _, _ = gns._fwd_cpp(x, w, b, 8, 1e-5)
    assert y[0, :8].isnan().all() and not y[0, 8:].isnan().any() and not y[1].isnan().any()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("G", [8, 32])
def test_statistics_when_a_groups_first_element_is_an_outlier(seed, isa, threads, layout, G):
    """Every group's first element 8 sigma above its mean. The kernels sum x - shift; a shift at that element made
    q/n - (s/n)^2 cancel by ~65x and y missed the rule by up to 10x (a fresh-seed CI run caught 2-sigma
    outliers); the shift is now the mean of the group's first 16 elements."""
    shape = (3, 64, 9, 11)  # groups of 8 or 2 channels x 99: past the 16 elements the shift averages
    x = make_x(shape, layout, torch.float32)
    x[:, :: 64 // G, 0, 0] = 0.5 + 8 * 2.0  # make_x's offset + 8 * its scale, in place on the layout's view
    w, b = affine(64)
    for wr, br in ((w, b), (None, None)):
        y, mean, rstd = gns._fwd_cpp(x, wr, br, G, 1e-5)
        assert_rule(y, ref64(x, G, wr, br), naive(x, G, wr, br), ATOL[torch.float32])
        xs = x.double().reshape(3, G, -1)
        torch.testing.assert_close(rstd.double(), (xs.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=4e-7)


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU runs only the portable kernels")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_paths_agree(seed, layout):
    """Every path computes the same math: equal to a few fp32 roundings, and each deterministic."""
    x = make_x((3, 96, 9, 11), layout, torch.float32)
    w, b = affine(96)
    dy = torch.randn_like(x)
    outs = {}
    try:
        for isa in ISAS + ISAS:
            EXT.group_norm_silu_cpu_isa(isa)
            y, mean, rstd = gns._fwd_cpp(x, w, b, 8, 1e-5)
            got = (y, mean, rstd, *gns._bwd_cpp(dy, x, w, b, mean, rstd, 8))
            if isa in outs:
                assert all(torch.equal(a, c) for a, c in zip(outs[isa], got)), isa
            outs[isa] = got
    finally:
        EXT.group_norm_silu_cpu_isa("auto")
    for isa in ISAS[1:]:
        for a, c in zip(outs["portable"], outs[isa]):
            torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-5)


def test_isa_switch():
    """Requests cap the kernels at what the CPU has; 'auto' restores the best; unknown names are refused."""
    try:
        for isa in ("portable", "avx2", "avx512"):
            expect = isa if isa in ISAS else BEST
            assert EXT.group_norm_silu_cpu_isa(isa) == expect and EXT.group_norm_silu_cpu_isa("") == expect
        assert EXT.group_norm_silu_cpu_isa("auto") == BEST
        with pytest.raises(ValueError, match="isa must be"):
            EXT.group_norm_silu_cpu_isa("sse2")
    finally:
        EXT.group_norm_silu_cpu_isa("auto")


def test_forward_without_stats_matches(seed, isa):
    """Null mean/rstd (inference): the same y, bitwise; a null mean with a real rstd is refused."""
    for layout in ("nchw", "channels_last"):
        x = make_x((2, 32, 5, 6), layout, torch.float32)
        w, b = affine(32)
        y_keep, _, _ = gns._fwd_cpp(x, w, b, 4, 1e-5)
        y_drop, mean, rstd = gns._fwd_cpp(x, w, b, 4, 1e-5, keep_stats=False)
        assert mean is None and rstd is None and torch.equal(y_keep, y_drop)
    r = torch.empty(8)
    with pytest.raises(ValueError, match="null"):
        EXT.group_norm_silu_fwd_cpu(x.data_ptr(), 0, 0, y_keep.data_ptr(), 0, r.data_ptr(), 2, 32, 30, 4, 1e-5, 0,
                                    0, 1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_function_inference_takes_the_lean_path(seed, layout, monkeypatch):
    """group_norm_silu under no_grad goes straight to the kernel, bitwise like the autograd path; inputs the lean
    path refuses still get the general path's errors."""
    calls = []
    real = gns._fwd_cpu_inference
    monkeypatch.setattr(gns, "_fwd_cpu_inference", lambda *a: calls.append(real(*a)) or calls[-1])
    x = make_x((2, 32, 6, 6), layout, torch.float32)
    w, b = affine(32)
    with torch.no_grad():
        y = group_norm_silu(x, 8, w, b)
    assert calls and calls[-1] is not None
    assert torch.equal(y, group_norm_silu(x, 8, w, b))  # w requires grad here: the autograd path
    with torch.no_grad():
        with pytest.raises(ValueError, match="eps"):
            group_norm_silu(x, 8, w, b, eps=math.inf)
        with pytest.raises(ValueError, match="num_groups"):
            group_norm_silu(x, 0, w, b)
        with pytest.raises(ValueError, match="divisible"):
            group_norm_silu(x, 5, w, b)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_silu_within_a_few_ulp(isa, layout):
    """The kernels' exp and sigmoid to within 4 ulp of silu in float64, on a grid of pre-activations: each
    channel holds eight +1 and eight -1 (mean 0 and rstd 1 exactly, eps = 0), so z = +-1 + bias[c] exactly as
    fp32 rounds it; the error rule's absolute tolerance could not see a few-ulp slip in the exp."""
    C = 4096
    bias = torch.linspace(-30.0, 30.0, C)
    x = torch.tensor([1.0, -1.0]).repeat(8).expand(1, C, 16).reshape(1, C, 4, 4).contiguous()
    x = make_x((1, C, 4, 4), layout, torch.float32).copy_(x)
    y, _, _ = gns._fwd_cpp(x, torch.ones(C), bias, C, 0.0)
    z = (x + bias.view(1, C, 1, 1)).double()  # fp32 sums, as the kernel's fma rounds them
    ref = z / (1 + torch.exp(-z))
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(ref.abs())))
    worst = ((y.double() - ref).abs() / ulp).max().item()
    assert worst <= 4.0, f"{worst:.2f} ulp"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_takes_the_lean_path(seed, layout, dtype, monkeypatch):
    """autograd's backward of the eager op goes straight to the kernel for dense 4-D input (bitwise the general
    backward's result), skips dweight/dbias when nothing asks for them, and falls back when dy's layout differs."""
    calls = []
    real = gns._bwd_cpu_lean
    monkeypatch.setattr(gns, "_bwd_cpu_lean", lambda *a: calls.append(real(*a)) or calls[-1])
    x = make_x((2, 32, 6, 6), layout, dtype).requires_grad_()
    w, b = affine(32)
    dy = torch.randn_like(x)
    gx, gw, gb = torch.autograd.grad(group_norm_silu(x, 8, w, b), (x, w, b), dy)
    assert calls[-1] is not None
    _, mean, rstd = gns._fwd_cpp(x.detach(), w, b, 8, 1e-5)
    dx, dw, db = gns._bwd_cpp(dy, x.detach(), w, b, mean, rstd, 8)
    assert torch.equal(gx, dx) and torch.equal(gw, dw) and torch.equal(gb, db)
    (gx2,) = torch.autograd.grad(group_norm_silu(x, 8, w.detach(), b.detach()), (x,), dy)
    assert calls[-1][1] is None and torch.equal(gx2, dx)  # no affine grads asked for: none reduced
    dy_other = dy.contiguous(memory_format=torch.channels_last) if layout == "nchw" else dy.contiguous()
    (gx3,) = torch.autograd.grad(group_norm_silu(x, 8, w, b), (x,), dy_other)
    assert calls[-1] is None and torch.equal(gx3, dx)


def test_double_backward_refused(seed):
    """First order only: differentiating the backward again fails loudly instead of returning wrong zeros."""
    x = make_x((2, 16, 4, 4), "nchw", torch.float64).requires_grad_()
    (gx,) = torch.autograd.grad((group_norm_silu(x, 4) ** 2).sum(), (x,), create_graph=True)  # dy needs grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
