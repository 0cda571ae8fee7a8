"""Fused forward noising for training: x_t = sqrt(abar[t]) x_0 + sqrt(1 - abar[t]) eps, eps drawn in the op.

``q_sample_ref`` is the specification (diffusion.q_sample). ``q_sample`` dispatches to the custom op
``ddpm_fast::q_sample_`` (eager calls skip its dispatch): one Triton kernel on CUDA that draws eps with Philox
(key = a seed in a device tensor, stream Q_SAMPLE) and writes both x_t and eps (the loss target); on the CPU the
C++ kernel draws the same Philox stream and one torch pass forms x_t. Change the seed every training step (e.g.
seed.add_(1) on the device): the noise is a pure function of (seed, element).
"""
from typing import Optional

import torch

from .. import diffusion
from ..diffusion.schedule import ROW
from . import _ext
from .common import check_backend, check_float_tensor, is_dense, match_layout, resolve_tables, warn_no_triton
from .noise import STREAM_Q_SAMPLE, noise_source, philox_noise


def q_sample_ref(schedule, x_start, t, noise):
    """The specification: x_t for x_start (N, C, *) at step indices t (N,) with the given noise."""
    return diffusion.q_sample(schedule, x_start, t, noise)


def _check_t(t, x_start, num_steps):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (x_start.shape[0],):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be an int64 tensor of shape ({x_start.shape[0]},) (one step index per sample), "
                         f"got {got}")
    if t.device != x_start.device:
        raise ValueError(f"t is on {t.device} but x_start is on {x_start.device}")
    if t.device.type != "cpu" or torch.compiler.is_compiling() or not t.numel():
        return  # checking values on a GPU would sync; out-of-range steps are clamped in the kernel
    if not (0 <= int(t.min()) and int(t.max()) < num_steps):
        raise ValueError(f"t must lie in [0, {num_steps}), got values in [{int(t.min())}, {int(t.max())}]")


def q_sample(schedule, x_start, t, *, noise=None, seed=None, generator=None, element_offset=0, backend=None):
    """Noise x_start to step indices t; returns (x_t, eps), both like x_start.

    :param schedule: NoiseSchedule or its ScheduleTables on x_start's device.
    :param x_start: (N, C, *) fp32/fp16/bf16 data.
    :param t: int64 (N,) step indices on x_start's device (range-checked on the CPU; clamped in the kernel).
    :param noise / seed / generator: exactly one eps source; with ``noise`` the returned eps is that tensor.
    :param element_offset: index of x_start's first element in the whole batch (chunks draw the same noise).
    :param backend: None (the custom op), or "triton" / "torch" (tests, benchmarks), as for ``p_step``.
    """
    check_backend(backend)
    check_float_tensor("x_start", x_start, x_start.device)
    tables = resolve_tables(schedule, x_start)
    _check_t(t, x_start, tables.num_steps)
    if isinstance(element_offset, bool) or not isinstance(element_offset, int) or element_offset < 0:
        raise ValueError(f"element_offset must be an int >= 0, got {element_offset!r}")
    noise, seed = noise_source(x_start, noise, generator, seed, needed=True)
    x_start = x_start if is_dense(x_start) else x_start.contiguous()
    x_t = torch.empty_like(x_start)
    eps = None
    if noise is None:
        eps = torch.empty_like(x_start)
    else:
        noise = match_layout(noise, x_start)
    args = (x_start, t, tables.packed, noise, seed, element_offset, x_t, eps)
    if backend is None and torch.compiler.is_compiling():
        torch.ops.ddpm_fast.q_sample_(*args)
    else:  # eager: skip the custom op's Python dispatch
        _q_sample(*args, use_triton=backend == "triton" or (backend is None and x_start.device.type != "cpu"))
    return x_t, (noise if eps is None else eps)


def _q_sample(x_start, t, table, noise, seed, element_offset, x_t, eps, use_triton):
    if use_triton and _ext.has_triton():
        from .triton.q_sample import q_sample_triton
        return q_sample_triton(x_start, t, table, noise, seed, element_offset, x_t, eps, STREAM_Q_SAMPLE)
    if x_start.device.type != "cpu":
        warn_no_triton()
    # CPU: eps from the C++ Philox kernel (the same stream as the GPU), then one torch pass
    if noise is None:
        noise = eps.copy_(philox_noise(x_start, seed, 0, STREAM_Q_SAMPLE, element_offset))
    shape = (-1,) + (1,) * (x_start.dim() - 1)
    sab = table[ROW["sqrt_alphas_cumprod"]].index_select(0, t).view(shape)
    s1mab = table[ROW["sqrt_one_minus_alphas_cumprod"]].index_select(0, t).view(shape)
    x_t.copy_(torch.addcmul(sab * x_start.float(), s1mab, noise.float()))


@torch.library.custom_op("ddpm_fast::q_sample_", mutates_args=("x_t", "eps"), device_types=("cpu", "cuda"))
def _q_sample_op(x_start: torch.Tensor, t: torch.Tensor, table: torch.Tensor, noise: Optional[torch.Tensor],
                 seed: Optional[torch.Tensor], element_offset: int, x_t: torch.Tensor,
                 eps: Optional[torch.Tensor]) -> None:
    """Writes x_t (and eps when noise is drawn). Arguments are validated by ``q_sample``."""
    _q_sample(x_start, t, table, noise, seed, element_offset, x_t, eps, x_start.device.type != "cpu")


@_q_sample_op.register_fake
def _q_sample_fake(x_start, t, table, noise, seed, element_offset, x_t, eps):
    return None
