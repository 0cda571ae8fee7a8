"""What every fused op needs before it launches: argument checks with clear errors (the sampler steps' model
output and guidance scale among them), the dense memory layouts the kernels accept (NCHW or channels-last) and how
to view a tensor in them, and the one "triton is missing" warning."""
import math

import torch

from ..diffusion import NoiseSchedule, ScheduleTables, split_model_output

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NCHW, NHWC = 0, 1  # layout codes shared with csrc/group_norm_silu.h


def resolve_tables(schedule, x):
    """float32 ScheduleTables on x's device from a NoiseSchedule or ScheduleTables."""
    if isinstance(schedule, NoiseSchedule):
        return schedule.tables(x.device)
    if not isinstance(schedule, ScheduleTables):
        raise ValueError(f"schedule must be a NoiseSchedule or ScheduleTables, got {type(schedule).__name__}")
    if schedule.device != x.device or schedule.packed.dtype != torch.float32:
        raise ValueError(f"schedule tables are {schedule.packed.dtype} on {schedule.device}; the op needs "
                         f"float32 tables on {x.device} (schedule.tables(device))")
    return schedule


def check_float_tensor(name, t, device, shape=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_model_output(model_output, x, variance, guidance_scale, name="x"):
    """Checks a sampler step's model output against x (N samples) and returns the guidance scale as the kernels
    read it: None (unguided: N samples), or a float32 one-element tensor on x's device (guided: 2N samples, the
    conditional outputs first). A float is copied to a new tensor; a tensor is used as is (read in the kernel, so
    a captured graph replays with whatever value it holds then; a CPU tensor is checked to be finite here)."""
    check_float_tensor("model_output", model_output, x.device)
    if guidance_scale is None:
        split_model_output(model_output, x, variance)
        return None
    n = x.shape[0]
    if model_output.dim() != x.dim() or model_output.shape[0] != 2 * n:
        raise ValueError(f"guidance_scale= needs a model_output of 2N = {2 * n} samples (the conditional outputs "
                         f"of {name}'s {n} samples, then their unconditional ones), got {tuple(model_output.shape)}")
    split_model_output(model_output[:n], x, variance)
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.dtype != torch.float32 or guidance_scale.numel() != 1:
            raise ValueError(f"guidance_scale must be a float or a float32 tensor with one element, got "
                             f"{guidance_scale.dtype} {tuple(guidance_scale.shape)}")
        if guidance_scale.device != x.device:
            raise ValueError(f"guidance_scale is on {guidance_scale.device} but {name} is on {x.device}")
        value = float(guidance_scale) if x.device.type == "cpu" and not torch.compiler.is_compiling() else 0.0
    elif isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a float or a float32 tensor, got {type(guidance_scale).__name__}")
    else:
        value = float(guidance_scale)
        guidance_scale = torch.tensor([value], dtype=torch.float32, device=x.device)
    if not math.isfinite(value):
        raise ValueError(f"guidance_scale must be finite, got {value}")
    return guidance_scale


def is_dense(x):
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def match_layout(t, like):
    """t with like's strides (like: dense NCHW or channels_last); a copy only when they differ."""
    if t.stride() == like.stride():
        return t
    fmt = torch.contiguous_format if like.is_contiguous() else torch.channels_last
    return t.contiguous(memory_format=fmt)


def check_backend(backend):
    if backend not in (None, "triton", "cpp", "torch"):
        raise ValueError(f"backend must be None, 'triton', 'cpp' or 'torch', got {backend!r}")


def nc_s_strides(t):
    """Strides (n, c, s) of t viewed as (N, C, S), S = its spatial dims merged; None if they do not merge."""
    stride = t.stride()
    if t.is_contiguous():
        return stride[0], stride[1], 1
    dims = [(n, st) for n, st in zip(t.shape[2:], stride[2:]) if n != 1]
    for (_, outer), (n_inner, inner) in zip(dims, dims[1:]):
        if outer != inner * n_inner:
            return None
    return stride[0], stride[1], dims[-1][1] if dims else 1


def is_nhwc(x):
    """True when x (N, C, *S) is laid out densely as (N, *S, C); strides of size-1 dims do not matter."""
    step = 1
    for dim in [1, *range(x.dim() - 1, 1, -1), 0]:
        if x.shape[dim] != 1 and x.stride(dim) != step:
            return False
        step *= x.shape[dim]
    return True


def prepare_layout(x):
    """(x, layout): x itself when NCHW- or NHWC-dense, else a dense copy (NHWC when channels are innermost)."""
    if x.is_contiguous():
        return x, NCHW
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):  # the common case, checked in C++
        return x, NHWC
    if x.dim() >= 3 and is_nhwc(x):
        return x, NHWC
    if x.dim() >= 3 and x.stride(1) == 1:
        perm = (0, *range(2, x.dim()), 1)
        inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return x.permute(perm).contiguous().permute(inv), NHWC
    return x.contiguous(), NCHW


def to_layout(t, like, layout):
    """t with the same dense layout as `like` (used for dy in the backward)."""
    if layout == NCHW:
        return t.contiguous()
    return t if t.stride() == like.stride() else torch.empty_like(like, dtype=t.dtype).copy_(t)


def warn_no_triton():
    import warnings
    warnings.warn("ddpm_fast: triton is not installed; the fused CUDA ops run as separate torch ops with host "
                  "syncs (not CUDA-graph capturable). `pip install triton`", RuntimeWarning, stacklevel=3)
