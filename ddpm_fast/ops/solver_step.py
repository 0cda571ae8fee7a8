"""The fused step of the few-step solvers (DPM-Solver++ 2M / 3M / SDE-2M, UniPC): x and the solver's history in,
x and the history out, in one pass over memory.

``solver_step_ref`` is the specification (the update formulas of diffusion/solvers.py). ``solver_step`` runs, by
device:
  CUDA: one Triton kernel reading the step's coefficients from the solver table at a step index that may live in
        device memory; SDE noise drawn in the kernel (Philox); no host sync, no allocation when ``out=`` is given:
        CUDA-graph capturable.
  CPU:  one C++ pass (csrc/solver_step_cpu.cpp, fp32), or in-place torch ops.
Eager calls go straight to the backend; under torch.compile the custom op ``ddpm_fast::solver_step_`` is used.

The history (``SolverState``) is float32, laid out like x and preallocated by the caller: h1 / h2 the previous
data predictions, ``last`` UniPC's previous corrected sample. Zero it before the first step of a chain (the first
step's coefficients give it weight 0, and 0 * NaN would not be 0).

dpmpp_2m_sde's noise: exactly one of ``noise=``, ``generator=``, ``seed=`` as for ``p_step``; the seeded stream is
p_step's (STREAM_P_STEP, step word = the step index), so for one seed the SDE solver at step index i draws the
numbers DDPM draws at step index i, and chunked == unchunked on every device.

Classifier-free guidance (``guidance_scale=w``) as for ``p_step``: a 2N-sample model output (conditional outputs
first), combined to u + w (c - u) inside the kernel before it becomes the data prediction.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import diffusion
from ..diffusion import NoiseSchedule, solvers
from . import _ext
from .common import (check_backend, check_float_tensor, check_model_output, is_dense, match_layout, nc_s_strides,
                     warn_no_triton)
from .noise import STREAM_P_STEP, _MASK64, host_offset, noise_source, offset_arg, philox_noise
from .p_step import _columns, _step_arg, host_guidance, model_prediction, step_coefs


@dataclass
class SolverState:
    """A solver's history between steps (float32, like x): h1, h2 = the previous two data predictions (h2 only
    for dpmpp_3m and unipc), last = the previous corrected sample (unipc only). None where unused."""
    h1: torch.Tensor
    h2: Optional[torch.Tensor] = None
    last: Optional[torch.Tensor] = None

    @classmethod
    def zeros_like(cls, x, sampler):
        """Zeroed buffers for ``sampler``, float32, with x's shape, device and memory layout."""
        solvers.check_solver(sampler)

        def buf():
            return torch.zeros_like(x, dtype=torch.float32)
        return cls(buf(), buf() if solvers.HISTORY[sampler] == 2 else None,
                   buf() if sampler in solvers.CORRECTOR else None)

    def zero_(self):
        for t in (self.h1, self.h2, self.last):
            if t is not None:
                t.zero_()
        return self


# ---- specification ----------------------------------------------------------------------------------------

def solver_step_ref(schedule, sampler, model_output, x, step, state, *, prediction="eps", variance="fixed_small",
                    noise=None, guidance_scale=None):
    """The plain-PyTorch specification of ``solver_step`` for one step index: returns (x after the step, the new
    SolverState); nothing is modified. Computes in float32 (float64 for float64 inputs), from the schedule's
    float64 alphas. With ``guidance_scale`` the 2N-sample model output is first combined
    (``diffusion.guided_model_output``)."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if guidance_scale is not None:
        model_output = diffusion.guided_model_output(model_output, x, variance, guidance_scale)
    out, _ = diffusion.split_model_output(model_output, x, variance)
    t = torch.full((x.shape[0],), int(step), dtype=torch.int64, device=x.device)
    m = diffusion.predict_x0(schedule, x, t, out, prediction)  # compute dtype, never clipped
    cdt = m.dtype

    def f(v):
        return None if v is None else v.to(cdt)
    points = solvers.chain_points(schedule.alphas_cumprod)
    k = schedule.num_steps - 1 - int(step)
    x_next, xc = solvers.solver_update_ref(sampler, points, k, x.to(cdt), m, f(state.h1), f(state.h2),
                                           f(state.last), f(noise))
    new = SolverState(m, f(state.h1) if state.h2 is not None else None, xc if state.last is not None else None)
    return x_next.to(x.dtype), new


# ---- public API -------------------------------------------------------------------------------------------

def solver_step(schedule, sampler, model_output, x, step, state, *, prediction="eps", variance="fixed_small",
                noise=None, seed=None, generator=None, element_offset=0, offset_mod4=None, out=None, backend=None,
                guidance_scale=None):
    """One fused solver step; returns x after the step (``out`` when given) and updates ``state`` in place.

    :param schedule: the chain's NoiseSchedule (its solver table is computed once and cached per device; call
        ``schedule.tables(device)`` and ``schedule.solver_tables(sampler, device)`` before capturing a graph).
    :param sampler: "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde" or "unipc".
    :param model_output: (N, C, *) or (N, 2C, *) for learned_range (its mean half is used); fp32/fp16/bf16. With
        ``guidance_scale``: (2N, C or 2C, *), x's conditional outputs then its unconditional ones.
    :param x: (N, C, *) fp32/fp16/bf16, dense (NCHW or channels_last).
    :param step: the STEP INDEX (num_steps-1 first, 0 = the last step, to sigma 0): an int, or an int64
        one-element tensor on x's device (read in the kernel: a captured graph can replay it with a new value).
    :param state: SolverState for this sampler (``SolverState.zeros_like(x, sampler)``), updated in place.
    :param noise, seed, generator: the SDE solver's noise source (see the module docstring); others take none.
    :param element_offset, offset_mod4: index of x's first element in the whole batch (sample index * C*H*W):
        an int, or an int64 one-element tensor on x's device read in the kernel (then offset_mod4 = its value % 4
        on the host, required on CUDA), as for ``p_step``.
    :param out: like x (same shape, dtype and strides); may be x itself for an in-place update.
    :param backend: None (automatic), "triton", "cpp" or "torch" (as for ``p_step``).
    :param guidance_scale: classifier-free guidance's w, as for ``p_step``: a float or a float32 one-element
        tensor on x's device (read in the kernel); None: no guidance.
    """
    tables, coefs, step_t, step_index, known, guidance = _check(schedule, sampler, model_output, x, step, state,
                                                                prediction, variance, backend, guidance_scale)
    needed = sampler in solvers.STOCHASTIC and known != 0
    noise, seed = noise_source(x, noise, generator, seed, needed)
    offset, host = offset_arg(element_offset, offset_mod4, x.device)
    if sampler not in solvers.STOCHASTIC and noise is not None:
        raise ValueError(f"sampler {sampler!r} draws no noise: noise= applies to dpmpp_2m_sde only")
    if out is None:
        out = torch.empty_like(x)
    elif out.dtype != x.dtype or out.stride() != x.stride() or out.shape != x.shape:
        raise ValueError(f"out must match x's shape, dtype and strides: x {x.dtype} {tuple(x.shape)} {x.stride()}, "
                         f"out {out.dtype} {tuple(out.shape)} {out.stride()}")
    if noise is not None:
        noise = match_layout(noise, x)
    if nc_s_strides(model_output) is None:
        model_output = model_output.contiguous()  # the kernels need one stride for the spatial dims
    args = (x, model_output, tables.packed, coefs.packed, step_t, step_index, noise, seed, host, offset,
            prediction, sampler, state.h1, state.h2, state.last, out, guidance)
    if backend is None and torch.compiler.is_compiling():
        torch.ops.ddpm_fast.solver_step_(*args)
    else:  # eager: skip the custom op's Python dispatch
        _BACKENDS[backend or _auto_backend(x, model_output, noise)](*args)
    return out


def _check(schedule, sampler, model_output, x, step, state, prediction, variance, backend, guidance_scale):
    """Every argument check, before any work -> (tables, solver tables, step tensor, step index, known step,
    guidance tensor or None)."""
    solvers.check_solver(sampler)
    diffusion.check_choice("prediction", prediction, diffusion.PREDICTIONS)
    diffusion.check_choice("variance", variance, diffusion.VARIANCES)
    check_backend(backend)
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule (its float64 alphas give the solver's coefficients), "
                         f"got {type(schedule).__name__}")
    check_float_tensor("x", x, x.device)
    guidance = check_model_output(model_output, x, variance, guidance_scale)
    if not is_dense(x):
        raise ValueError("x must be dense (contiguous or channels_last)")
    _check_state(state, sampler, x)
    tables = schedule.tables(x.device)
    step_t, step_index, known = _step_arg(step, x.device, tables.num_steps)
    return tables, schedule.solver_tables(sampler, x.device), step_t, step_index, known, guidance


def _check_state(state, sampler, x):
    if not isinstance(state, SolverState):
        raise ValueError(f"state must be a SolverState (SolverState.zeros_like(x, sampler)), got "
                         f"{type(state).__name__}")
    want = {"h1": True, "h2": solvers.HISTORY[sampler] == 2, "last": sampler in solvers.CORRECTOR}
    for name, needed in want.items():
        buf = getattr(state, name)
        if needed and buf is None:
            raise ValueError(f"sampler {sampler!r} needs state.{name} (SolverState.zeros_like(x, {sampler!r}))")
        if buf is not None and (buf.dtype != torch.float32 or buf.shape != x.shape or buf.stride() != x.stride()
                                or buf.device != x.device):
            raise ValueError(f"state.{name} must be float32 with x's shape, strides and device: got {buf.dtype} "
                             f"{tuple(buf.shape)} {buf.stride()} on {buf.device}, x {tuple(x.shape)} {x.stride()} "
                             f"on {x.device}")


def _auto_backend(x, model_output, noise):
    if x.device.type != "cpu":
        if _ext.has_triton():
            return "triton"
        warn_no_triton()
        return "torch"
    fp32 = all(t is None or t.dtype == torch.float32 for t in (x, model_output, noise))
    return "cpp" if fp32 and _ext.has_cpu_kernels() else "torch"


# ---- the custom op ----------------------------------------------------------------------------------------

@torch.library.custom_op("ddpm_fast::solver_step_", mutates_args=("h1", "h2", "last", "out"),
                         device_types=("cpu", "cuda"))
def _solver_step_op(x: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor, coefs: torch.Tensor,
                    step: Optional[torch.Tensor], step_index: int, noise: Optional[torch.Tensor],
                    seed: Optional[torch.Tensor], element_offset: int, offset: Optional[torch.Tensor],
                    prediction: str, sampler: str, h1: torch.Tensor, h2: Optional[torch.Tensor],
                    last: Optional[torch.Tensor], out: torch.Tensor, guidance: Optional[torch.Tensor]) -> None:
    """Writes x after the step into out and updates the history. Arguments are validated by ``solver_step``;
    element_offset and offset are what ``ops.noise.offset_arg`` returns; guidance the guidance-scale tensor of a
    2N-sample model output, or None."""
    args = (x, model_output, table, coefs, step, step_index, noise, seed, element_offset, offset, prediction,
            sampler, h1, h2, last, out, guidance)
    _BACKENDS[_auto_backend(x, model_output, noise)](*args)


@_solver_step_op.register_fake
def _solver_step_fake(x, model_output, table, coefs, step, step_index, noise, seed, element_offset, offset,
                      prediction, sampler, h1, h2, last, out, guidance):
    return None


# ---- backends ---------------------------------------------------------------------------------------------

def _host_coefs(table, coefs, step, step_index, prediction):
    """(step index, p, q, {row: coefficient}) as Python floats (a sync on CUDA; columns cached per table)."""
    i = int(step) if step is not None else step_index
    if not 0 <= i < coefs.shape[1]:
        raise ValueError(f"step index {i} out of range [0, {coefs.shape[1]})")
    p, q, *_ = step_coefs(_columns(table)[i], prediction, False, 0.0)
    return i, p, q, _columns(coefs, solvers.ROWS)[i]


def _solver_step_cpp(x, model_output, table, coefs, step, step_index, noise, seed, element_offset, offset,
                     prediction, sampler, h1, h2, last, out, guidance=None):
    """One C++ pass (fp32 CPU tensors, x/out/noise/history dense alike, model output with mergeable spatial dims)."""
    ext = _ext.load()
    if ext is None or x.device.type != "cpu" or any(
            t is not None and t.dtype != torch.float32 for t in (x, model_output, noise)):
        raise ValueError("backend 'cpp' needs the compiled extension and float32 CPU tensors")
    i, p, q, c = _host_coefs(table, coefs, step, step_index, prediction)
    N, C = x.shape[:2]
    mo_sn, mo_sc, mo_ss = nc_s_strides(model_output)

    def ptr(t):
        return 0 if t is None else t.data_ptr()
    ext.solver_step_fused_cpu(ptr(x), ptr(model_output), ptr(noise), ptr(out), ptr(h1), ptr(h2), ptr(last), N, C,
                              math.prod(x.shape[2:]), not x.is_contiguous(), mo_sn, mo_sc, mo_ss, p, q,
                              *(c[name] for name in solvers.ROWS), sampler in solvers.STOCHASTIC and c["s"] != 0,
                              0 if seed is None else int(seed) & _MASK64, i, STREAM_P_STEP,
                              host_offset(offset, element_offset), *host_guidance(guidance, N, model_output),
                              torch.get_num_threads())


def _solver_step_torch(x, model_output, table, coefs, step, step_index, noise, seed, element_offset, offset,
                       prediction, sampler, h1, h2, last, out, guidance=None):
    """torch ops with Python-float coefficients (several passes; reading them on CUDA syncs)."""
    i, p, q, c = _host_coefs(table, coefs, step, step_index, prediction)
    xf, mf = x.float(), model_prediction(model_output, x.shape[0], x.shape[1], guidance)
    m = mf.clone() if prediction == "x0" else torch.mul(xf, p).add_(mf, alpha=q)
    xc = xf
    if last is not None:
        xc = torch.mul(xf, c["cx"]).add_(last, alpha=c["cl"]).add_(m, alpha=c["c0"]).add_(h1, alpha=c["c1"])
        if h2 is not None:
            xc.add_(h2, alpha=c["c2"])
    res = torch.mul(xc, c["a"]).add_(m, alpha=c["b0"]).add_(h1, alpha=c["b1"])
    if h2 is not None:
        res.add_(h2, alpha=c["b2"])
    if sampler in solvers.STOCHASTIC and c["s"] != 0:
        z = noise.float() if noise is not None else philox_noise(x, seed, i, STREAM_P_STEP,
                                                                 host_offset(offset, element_offset))
        res.add_(z, alpha=c["s"])
    if last is not None:
        last.copy_(xc)
    if h2 is not None:
        h2.copy_(h1)
    h1.copy_(m)
    out.copy_(res)


def _solver_step_triton(*args):
    if not _ext.has_triton():
        raise ValueError("backend 'triton' needs triton installed")
    from .triton.solver_step import solver_step_triton
    solver_step_triton(*args, stream=STREAM_P_STEP)


_BACKENDS = {"cpp": _solver_step_cpp, "torch": _solver_step_torch, "triton": _solver_step_triton}
