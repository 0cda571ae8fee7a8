"""Fused GroupNorm + SiLU: y = silu(group_norm(x, G, weight, bias, eps)).

Public API: ``group_norm_silu`` (function), ``GroupNormSiLU`` (an ``nn.GroupNorm`` whose forward is fused)
and ``group_norm_silu_ref`` (the specification). The op is ``torch.ops.ddpm_fast.group_norm_silu`` returning
``(y, mean, rstd)``; its backward is ``torch.ops.ddpm_fast.group_norm_silu_backward``. Kernels by device:

    cpu:  C++ (_C, OpenMP) for float32/bfloat16/float64, else the reference
    cuda: C++/CUDA (_C built with nvcc, and usable on the device: ops/device.py) for float32/float16/bfloat16,
          else Triton, else the reference

x may be NCHW-contiguous or channels-last (NHWC) -- both are read in place and y keeps that layout; any
other strides are copied to one of the two first. Statistics are computed in fp32 (float64 for float64 x).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ext
from . import device as _device
from .common import NCHW, NHWC, prepare_layout, to_layout

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def group_norm_silu_ref(x, num_groups, weight=None, bias=None, eps=1e-5):
    """The specification. x: (N, C, *), any float dtype; output in x.dtype. The math runs in fp32 (float64
    for float64 x): low-precision inputs are upcast, as the kernels do."""
    dt = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(x.to(dt), num_groups, None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    return F.silu(y).to(x.dtype)


# ----------------------------------------------------------------------------- validation and layout
def _check(x, num_groups, weight, bias, eps):
    """Raises a clear error for bad input before any kernel runs."""
    if not isinstance(x, Tensor):
        raise TypeError(f"group_norm_silu: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"group_norm_silu: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"group_norm_silu: unsupported dtype {x.dtype} (use float32, float16, bfloat16 or "
                        f"float64)")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must have shape (N, C, *), got {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"group_norm_silu: C={C} channels must be divisible by num_groups={num_groups} "
                         f"(a positive int)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (C,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"group_norm_silu: {name} must be floating point, got {t.dtype}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"group_norm_silu: eps must be a finite number >= 0, got {eps}")


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sizes(x, num_groups):
    return x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups


def _param(t, dtype):
    """weight/bias as a contiguous tensor of the kernel's stats dtype, or None."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _empty_stats(x, num_groups):
    """mean, rstd: (N, G) in the stats dtype (separate tensors: op outputs must not alias each other)."""
    shape, dt = (x.shape[0], num_groups), _stats_dtype(x)
    return torch.empty(shape, dtype=dt, device=x.device), torch.empty(shape, dtype=dt, device=x.device)


# ----------------------------------------------------------------------------- backends
def _fwd_cpp(x, weight, bias, num_groups, eps, keep_stats=True):
    """C++ CPU or CUDA kernel (by x.device). Returns (y, mean, rstd); mean/rstd are None when keep_stats is
    False on the CPU (inference: the kernel keeps them to itself)."""
    x, layout = prepare_layout(x)
    N, C, HW, G = _sizes(x, num_groups)
    y = torch.empty_like(x)
    if keep_stats or x.is_cuda:
        mean, rstd = _empty_stats(x, G)
        sd, mean_ptr, rstd_ptr = mean.dtype, mean.data_ptr(), rstd.data_ptr()
    else:
        mean = rstd = None
        sd, mean_ptr, rstd_ptr = _stats_dtype(x), 0, 0
    w, b = _param(weight, sd), _param(bias, sd)
    ext, code = _ext.load(), _DTYPE_CODES[x.dtype]
    if x.is_cuda:
        with _device.on_device(x.device):
            ext.group_norm_silu_fwd_cuda(x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), mean_ptr, rstd_ptr,
                                         N, C, HW, G, float(eps), code, layout,
                                         torch.cuda.current_stream(x.device).cuda_stream)
    else:
        ext.group_norm_silu_fwd_cpu(x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), mean_ptr, rstd_ptr,
                                    N, C, HW, G, float(eps), code, layout, torch.get_num_threads())
    return y, mean, rstd


def _bwd_cpp(dy, x, weight, bias, mean, rstd, num_groups):
    """C++ CPU or CUDA backward. Returns (dx, dweight, dbias); dweight/dbias in the stats dtype."""
    x, layout = prepare_layout(x)
    dy = to_layout(dy.to(x.dtype), x, layout)
    N, C, HW, G = _sizes(x, num_groups)
    sd = mean.dtype
    dx = torch.empty_like(x)
    dw, db = x.new_empty((C,), dtype=sd), x.new_empty((C,), dtype=sd)
    w, b = _param(weight, sd), _param(bias, sd)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    ext, code = _ext.load(), _DTYPE_CODES[x.dtype]
    ptrs = (dy.data_ptr(), x.data_ptr(), _ptr(w), _ptr(b), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
            dw.data_ptr(), db.data_ptr())
    if x.is_cuda:
        ws_floats = ext.group_norm_silu_cuda_workspace(N, C, HW, G)
        ws = torch.empty((max(ws_floats, 1),), dtype=torch.float32, device=x.device)
        with _device.on_device(x.device):
            ext.group_norm_silu_bwd_cuda(*ptrs, ws.data_ptr(), ws_floats, N, C, HW, G, code, layout,
                                         torch.cuda.current_stream(x.device).cuda_stream)
    else:
        ext.group_norm_silu_bwd_cpu(*ptrs, N, C, HW, G, code, layout, torch.get_num_threads())
    return dx, dw, db


def _fwd_ref(x, weight, bias, num_groups, eps):
    """The reference, returning (y, mean, rstd) with the same layouts and dtypes as the kernels."""
    x, _ = prepare_layout(x)
    y = torch.empty_like(x)
    mean, rstd = _empty_stats(x, num_groups)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    y.copy_(group_norm_silu_ref(x, num_groups, weight, bias, eps))
    var, mu = torch.var_mean(x.to(mean.dtype).reshape(x.shape[0], num_groups, -1), dim=-1, correction=0)
    return y, mean.copy_(mu), rstd.copy_(torch.rsqrt(var + eps))


def _bwd_ref(dy, x, weight, bias, mean, rstd, num_groups):
    """Backward in plain PyTorch from the saved statistics (checked against autograd of the ref in tests)."""
    x, layout = prepare_layout(x)
    N, C, HW, G = _sizes(x, num_groups)
    sd = mean.dtype
    x4, dy4 = x.to(sd).reshape(N, G, C // G, HW), dy.to(sd).reshape(N, G, C // G, HW)
    w4 = (torch.ones(C, dtype=sd, device=x.device) if weight is None else weight.to(sd)).view(1, G, C // G, 1)
    b4 = (torch.zeros(C, dtype=sd, device=x.device) if bias is None else bias.to(sd)).view(1, G, C // G, 1)
    xhat = (x4 - mean.view(N, G, 1, 1)) * rstd.view(N, G, 1, 1)
    z = xhat * w4 + b4
    s = torch.sigmoid(z)
    dz = dy4 * s * (1 + z * (1 - s))
    dxhat = dz * w4
    dx4 = rstd.view(N, G, 1, 1) * (dxhat - dxhat.mean((2, 3), keepdim=True)
                                   - xhat * (dxhat * xhat).mean((2, 3), keepdim=True))
    dx = torch.empty_like(x).copy_(dx4.reshape(x.shape))
    return dx, (dz * xhat).sum((0, 3)).reshape(C), dz.sum((0, 3)).reshape(C)


def _triton_ok(x, num_groups):
    if not (_ext.has_triton() and x.dtype in _CUDA_DTYPES):
        return False
    from .triton import group_norm_silu as tk
    return tk.supported(x.shape[1] // num_groups)


def _pick_fwd(x, num_groups):
    if x.device.type == "cpu" and _ext.has_cpu_kernels() and x.dtype in _CPU_DTYPES:
        return _fwd_cpp
    if x.device.type == "cuda":
        if x.dtype in _CUDA_DTYPES and _device.cuda_kernels_usable(x.device):
            return _fwd_cpp
        if _triton_ok(x, num_groups):
            from .triton.group_norm_silu import _group_norm_silu_fwd
            return _group_norm_silu_fwd
    return _fwd_ref


def _pick_bwd(x, num_groups):
    if x.device.type == "cpu" and _ext.has_cpu_kernels() and x.dtype in _CPU_DTYPES:
        return _bwd_cpp
    if x.device.type == "cuda":
        if x.dtype in _CUDA_DTYPES and _device.cuda_kernels_usable(x.device):
            return _bwd_cpp
        if _triton_ok(x, num_groups):
            from .triton.group_norm_silu import _group_norm_silu_bwd
            return _group_norm_silu_bwd
    return _bwd_ref


# ----------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("ddpm_fast::group_norm_silu", mutates_args=())
def _group_norm_silu_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                        eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd). x: (N, C, *); y: like x (same dtype and dense layout); mean, rstd: (N, G) fp32
    (float64 for float64 x). Devices without a kernel of their own run the reference."""
    _check(x, num_groups, weight, bias, eps)
    return _fwd_ref(x, weight, bias, num_groups, eps)


@_group_norm_silu_op.register_kernel(("cpu", "cuda"))
def _group_norm_silu_kernel(x, weight, bias, num_groups, eps):
    _check(x, num_groups, weight, bias, eps)
    return _pick_fwd(x, num_groups)(x, weight, bias, num_groups, eps)


@_group_norm_silu_op.register_fake
def _group_norm_silu_fake(x, weight, bias, num_groups, eps):
    _check(x, num_groups, weight, bias, eps)
    x, _ = prepare_layout(x)
    return (torch.empty_like(x), *_empty_stats(x, num_groups))


@torch.library.custom_op("ddpm_fast::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                 mean: Tensor, rstd: Tensor, num_groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of y = silu(group_norm(x)) given dy, recomputing y's pre-activation from x and
    the forward's mean/rstd. dx: like x; dweight, dbias: (C,) in mean's dtype (also when weight is None)."""
    return _bwd_ref(dy, x, weight, bias, mean, rstd, num_groups)


@_group_norm_silu_backward_op.register_kernel(("cpu", "cuda"))
def _group_norm_silu_backward_kernel(dy, x, weight, bias, mean, rstd, num_groups):
    return _pick_bwd(x, num_groups)(dy, x, weight, bias, mean, rstd, num_groups)


@_group_norm_silu_backward_op.register_fake
def _group_norm_silu_backward_fake(dy, x, weight, bias, mean, rstd, num_groups):
    x, _ = prepare_layout(x)
    C = x.shape[1]
    return torch.empty_like(x), mean.new_empty((C,)), mean.new_empty((C,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups = num_groups


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.ddpm_fast.group_norm_silu_backward(dy, x, weight, bias, mean, rstd, ctx.num_groups)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (dx.to(x.dtype) if need_x else None, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None, None, None)


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the inference op (torch.compile)
# Under torch.compile each fused op is one node of inductor's graph. On the CPU, a compiled model that wants no
# gradient (sampling) calls this op instead of the one above: y written into ``out``, no statistics, registered
# with the plain torch.library API (custom_op's Python layers cost ~15 us a call, as much as the kernel at a small
# U-Net's shapes), and ``out`` allocated by inductor, which reuses dead buffers for it: a fresh output per call
# costs a malloc and its page faults, as much again.
#
# COMPILED_CPU_INFERENCE picks what a compiled CPU graph without gradients gets: "op" (this op, one node per
# site) or "inductor" (the plain group_norm + silu, which inductor fuses into its own generated C++ loop with no
# Python call per site). Chosen by measurement: docs/compile.md, benchmarks/profile_compile.py.
COMPILED_CPU_INFERENCE = "inductor"
_LIB = torch.library.Library("ddpm_fast", "FRAGMENT")
_LIB.define("group_norm_silu_inference_out(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, "
            "Tensor(a!) out) -> ()")


def _inference_out_kernel(x, weight, bias, num_groups, eps, out):
    """out <- silu(group_norm(x)); out: x's shape and dtype (any strides; x's dense layout takes the fast path)."""
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"group_norm_silu_inference_out: out must be like x {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if x.is_cpu and _fwd_cpu_inference(x, num_groups, weight, bias, eps, out=out) is not None:
        return
    _check(x, num_groups, weight, bias, eps)
    out.copy_(_pick_fwd(x, num_groups)(x, weight, bias, num_groups, eps)[0])


_LIB.impl("group_norm_silu_inference_out", _inference_out_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("ddpm_fast::group_norm_silu_inference_out", lib=_LIB)
def _inference_out_fake(x, weight, bias, num_groups, eps, out):
    _check(x, num_groups, weight, bias, eps)


# ----------------------------------------------------------------------------- eager fast path
# torch.library dispatch costs ~50-80 us per call here (measured), as much as the kernel on small tensors.
# Plain eager calls therefore go straight to the same kernels through an autograd.Function; anything that
# traces or transforms (torch.compile, FakeTensor, dispatch/function modes, functorch) takes the op.
_EAGER_FAST_PATH = True


def _plain_eager(*tensors):
    if not _EAGER_FAST_PATH or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    try:
        if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active()):
            return False
    except AttributeError:  # private hooks moved: be safe, use the op
        return False
    for t in tensors:
        if t is not None and not ((type(t) is Tensor or type(t) is nn.Parameter) and (t.is_cpu or t.is_cuda)):
            return False
    return True


class _GroupNormSiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        y, mean, rstd = _pick_fwd(x, num_groups)(x, weight, bias, num_groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    def backward(ctx, dy):
        # A plain backward runs with grad off; with create_graph=True, once_differentiable's wrapper makes a
        # second differentiation fail loudly. Its no_grad context costs ~5 us a call, so only that case pays it.
        if torch.is_grad_enabled():
            return _backward_once(ctx, dy)
        return _backward_grads(ctx, dy)


def _backward_grads(ctx, dy):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grads = _bwd_cpu_lean(dy, x, weight, bias, mean, rstd, ctx.num_groups, need_w or need_b)
    dx, dw, db = grads if grads is not None else \
        _pick_bwd(x, ctx.num_groups)(dy, x, weight, bias, mean, rstd, ctx.num_groups)
    return (_as_dtype(dx, x) if need_x else None, _as_dtype(dw, weight) if need_w else None,
            _as_dtype(db, bias) if need_b else None, None, None)


_backward_once = torch.autograd.function.once_differentiable(_backward_grads)


def _as_dtype(t, like):
    return t if t.dtype is like.dtype else t.to(like.dtype)


# ----------------------------------------------------------------------------- public API
def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """y = silu(group_norm(x, num_groups, weight, bias, eps)), fused; differentiable in x, weight, bias.

    x: (N, C, *), float32/float16/bfloat16/float64, NCHW-contiguous or channels-last (kept in y).
    weight, bias: (C,) or None, any float dtype (cast to fp32 for the math). Returns y: like x, x.dtype.
    Works under autocast (y keeps x's dtype), torch.compile (fullgraph) and CUDA graph capture.
    """
    if type(x) is Tensor and x.is_cpu and not _wants_grad(x, weight, bias) and _plain_eager():
        y = _fwd_cpu_inference(x, num_groups, weight, bias, eps)
        if y is not None:
            return y
    eps = float(eps)
    if not _plain_eager(x, weight, bias):
        if x.is_cpu and torch.compiler.is_compiling() and not _wants_grad(x, weight, bias):
            if COMPILED_CPU_INFERENCE == "inductor":  # inductor generates the fused loop (fp32/fp64 math)
                f = (lambda t: None if t is None else t.to(_stats_dtype(x)))  # noqa: E731
                return F.silu(F.group_norm(f(x), num_groups, f(weight), f(bias), eps)).to(x.dtype)
            y = torch.empty_like(x)  # x's strides when x is dense (the kernel's fast path)
            torch.ops.ddpm_fast.group_norm_silu_inference_out(x, weight, bias, num_groups, eps, y)
            return y
        return torch.ops.ddpm_fast.group_norm_silu(x, weight, bias, num_groups, eps)[0]
    _check(x, num_groups, weight, bias, eps)
    if _wants_grad(x, weight, bias):
        return _GroupNormSiLUFunction.apply(x, weight, bias, num_groups, eps)
    fwd = _pick_fwd(x, num_groups)
    return fwd(x, weight, bias, num_groups, eps, keep_stats=False)[0] if fwd is _fwd_cpp else \
        fwd(x, weight, bias, num_groups, eps)[0]


def _wants_grad(x, weight, bias):
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


# ----------------------------------------------------------------------------- CPU inference fast path
# x.dtype -> (kernel dtype code, stats dtype) for the dtypes the CPU kernels take
_CPU_CODES = {torch.float32: (0, torch.float32), torch.bfloat16: (2, torch.float32),
              torch.float64: (3, torch.float64)}


def _fwd_cpu_inference(x, num_groups, weight, bias, eps, out=None):
    """y for the common inference call on the CPU (no autograd; 4-D float32/bfloat16/float64, NCHW- or
    channels_last-dense; plain float parameters of the stats dtype), straight into the C++ kernel, which keeps
    mean/rstd to itself: the checks of the general path cost ~3x the kernel on small tensors. None when the
    call is not that common case (the general path then handles it, or raises the clear error). ``out``: write
    y there (x's shape, dtype and strides; else None is returned) instead of a new tensor."""
    spec = _CPU_CODES.get(x.dtype)
    if spec is None or x.dim() != 4 or type(num_groups) is not int or num_groups < 1:
        return None
    N, C, H, W = x.shape
    eps = float(eps)
    if N == 0 or C % num_groups or not 0.0 <= eps < math.inf:
        return None
    if x.is_contiguous():
        layout = NCHW
    elif x.is_contiguous(memory_format=torch.channels_last):
        layout = NHWC
    else:
        return None
    for t in (weight, bias):
        if t is not None and not ((type(t) is Tensor or type(t) is nn.Parameter) and t.dtype is spec[1]
                                  and t.is_cpu and t.dim() == 1 and t.shape[0] == C and t.is_contiguous()):
            return None
    ext = _ext.load()
    if ext is None or (out is not None and (out.stride() != x.stride() or out.dtype is not x.dtype)):
        return None
    y = torch.empty_like(x) if out is None else out
    ext.group_norm_silu_fwd_cpu(x.data_ptr(), 0 if weight is None else weight.data_ptr(),
                                0 if bias is None else bias.data_ptr(), y.data_ptr(), 0, 0,
                                N, C, H * W, num_groups, eps, spec[0], layout, torch.get_num_threads())
    return y


def _bwd_cpu_lean(dy, x, weight, bias, mean, rstd, num_groups, affine_grads):
    """(dx, dweight, dbias) straight from the C++ kernel for the common CPU backward (4-D float32/bfloat16/float64
    x, NCHW- or channels_last-dense, dy of the same dtype and layout, parameters of the stats dtype); dweight and
    dbias are None when affine_grads is False (the kernel then skips their reduction). None when the call is not
    that case: the general backward (_bwd_cpp) handles it. Saves ~15 us of layout and dtype handling a call."""
    spec = _CPU_CODES.get(x.dtype)
    if spec is None or not x.is_cpu or dy.dtype is not x.dtype or x.dim() != 4:
        return None
    if x.is_contiguous() and dy.is_contiguous():
        layout = NCHW
    elif x.is_contiguous(memory_format=torch.channels_last) and dy.is_contiguous(memory_format=torch.channels_last):
        layout = NHWC
    else:
        return None
    sd, ext = spec[1], _ext.load()
    for t in (weight, bias, mean, rstd):
        if t is not None and not (t.dtype is sd and t.is_contiguous()):
            return None
    if ext is None:
        return None
    N, C, H, W = x.shape
    dx = torch.empty_like(x)
    dw, db = (torch.empty(C, dtype=sd), torch.empty(C, dtype=sd)) if affine_grads else (None, None)
    ext.group_norm_silu_bwd_cpu(dy.data_ptr(), x.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(),
                                rstd.data_ptr(), dx.data_ptr(), _ptr(dw), _ptr(db), N, C, H * W, num_groups,
                                spec[0], layout, torch.get_num_threads())
    return dx, dw, db


class GroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU, fused; state_dict identical to nn.GroupNorm's."""

    def forward(self, x):
        if type(x) is Tensor and x.is_cpu and not torch.is_grad_enabled() and _plain_eager():
            y = _fwd_cpu_inference(x, self.num_groups, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
