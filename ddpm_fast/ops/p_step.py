"""The fused reverse step x_t -> x_{t-1} (DDPM ancestral or DDIM).

``p_step_ref`` is the specification (diffusion.ddpm_step / ddim_step). ``p_step`` runs, by device:
  CUDA: one Triton kernel; noise drawn in the kernel (Philox), step and seed readable from device tensors, no
        host sync, no allocation when ``out=`` is given: CUDA-graph capturable.
  CPU:  one C++ pass (csrc/p_step_cpu.cpp, fp32) drawing the SAME Philox stream, or in-place torch ops.
Eager calls go straight to the backend; under torch.compile the custom op ``ddpm_fast::p_step_`` is used.

Noise sources, exactly one of: ``noise=`` (a tensor; deterministic, comparable to the reference),
``generator=`` (noise = torch.randn(x_t.shape, generator=...), float32, drawn only when the step needs noise:
diffusers' convention), ``seed=`` (an int64 device tensor of one element, or an int for eager use): element e
(memory-order index + element_offset) of step k draws Philox4x32-10 with key = seed, counter = (e // 4, k,
stream, e // 4 >> 32), so CPU and CUDA draw the same numbers up to float rounding (ops/noise.py).
``seeded_randn`` (the sampler's initial noise) lives in ops/noise.py and is importable from here too.

Classifier-free guidance (``guidance_scale=w``): the model output holds 2N samples, the conditional outputs of
x_t's N samples first, then their unconditional ones; the step uses u + w (c - u) (a learned variance: c's), read
and combined inside the kernel (``diffusion.guided_model_output`` is the specification).
"""
import math
import weakref
from typing import Optional

import torch

from .. import diffusion
from ..diffusion.schedule import ROWS
from . import _ext
from .common import (check_backend, check_float_tensor, check_model_output, is_dense, match_layout, nc_s_strides,
                     resolve_tables, warn_no_triton)
from .noise import STREAM_P_STEP, _MASK64, host_offset, noise_source, offset_arg, philox_noise
from .noise import seeded_randn  # noqa: F401  (documented as ddpm_fast.ops.p_step.seeded_randn)


# ---- specification ----------------------------------------------------------------------------------------

def p_step_ref(schedule, model_output, x_t, step, *, prediction="eps", variance="fixed_small", clip=True,
               sampler="ddpm", eta=0.0, noise=None, guidance_scale=None):
    """The plain-PyTorch specification of ``p_step`` for one step index shared by the batch; with
    ``guidance_scale`` the 2N-sample model output is first combined (``diffusion.guided_model_output``)."""
    t = torch.full((x_t.shape[0],), int(step), dtype=torch.int64, device=x_t.device)
    if guidance_scale is not None:
        model_output = diffusion.guided_model_output(model_output, x_t, variance, guidance_scale)
    kw = dict(prediction=prediction, variance=variance, clip=clip)
    if sampler == "ddpm":
        return diffusion.ddpm_step(schedule, model_output, x_t, t, noise, **kw)
    return diffusion.ddim_step(schedule, model_output, x_t, t, noise, eta=eta, **kw)


# ---- validation -------------------------------------------------------------------------------------------

def _step_arg(step, device, num_steps):
    """(step tensor or None, step index int, step value if known on the host else None)."""
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1:
            raise ValueError(f"step must be an int or an int64 tensor with one element, got {step.dtype} "
                             f"{tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but x_t is on {device}")
        if step.device.type != "cpu" or torch.compiler.is_compiling():
            return step, 0, None  # read in the kernel; no host sync
        step_index = int(step)
    elif isinstance(step, bool) or not hasattr(step, "__index__"):
        raise ValueError(f"step must be an int or an int64 tensor, got {type(step).__name__}")
    else:
        step_index, step = int(step), None
    if not 0 <= step_index < num_steps:
        raise ValueError(f"step index {step_index} out of range [0, {num_steps}) (a STEP INDEX into the "
                         "schedule, not a training timestep)")
    return step, step_index, step_index


def check_options(prediction, variance, sampler, eta):
    diffusion.check_choice("prediction", prediction, diffusion.PREDICTIONS)
    diffusion.check_choice("variance", variance, diffusion.VARIANCES)
    diffusion.check_choice("sampler", sampler, diffusion.STEP_SAMPLERS)
    if not (isinstance(eta, (int, float)) and eta >= 0 and eta < float("inf")):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError("eta applies to sampler='ddim' only")


# ---- public API -------------------------------------------------------------------------------------------

def p_step(schedule, model_output, x_t, step, *, prediction="eps", variance="fixed_small", clip=True,
           sampler="ddpm", eta=0.0, noise=None, seed=None, generator=None, element_offset=0, offset_mod4=None,
           out=None, backend=None, guidance_scale=None):
    """One fused reverse step; returns x_{t-1} (``out`` when given).

    :param schedule: NoiseSchedule (or its ScheduleTables on x_t's device); call ``schedule.tables(device)``
        once before capturing a CUDA graph.
    :param model_output: (N, C, *) or (N, 2C, *) for learned_range; fp32/fp16/bf16, any layout. With
        ``guidance_scale``: (2N, C or 2C, *), x_t's conditional outputs then its unconditional ones.
    :param x_t: (N, C, *) fp32/fp16/bf16, on the schedule's device.
    :param step: the STEP INDEX (0 = last step, no noise): an int, or an int64 one-element tensor on x_t's
        device (read in the kernel: a captured graph can replay it with a new value).
    :param eta: DDIM's eta >= 0 (sampler="ddim" only).
    :param element_offset: index of x_t's first element in the whole batch (sample index * C*H*W), so a chunk
        draws the noise the unchunked run would: an int, or an int64 one-element tensor on x_t's device (read in
        the kernel: one captured graph serves every chunk whose offset has the same residue mod 4).
    :param offset_mod4: element_offset % 4 when element_offset is a device tensor (required on CUDA: the launch
        geometry is chosen on the host); optional, and checked, for a CPU tensor.
    :param out: like x_t (same shape, dtype and strides); may be x_t itself for an in-place update.
    :param backend: None (automatic), or one of "triton", "cpp", "torch" (tests and benchmarks; "triton" on
        CPU tensors needs TRITON_INTERPRET=1, "cpp" needs fp32 CPU tensors and the compiled extension).
    :param guidance_scale: classifier-free guidance's w: a float, or a float32 one-element tensor on x_t's device
        (read in the kernel: a captured graph replays with any w); the step uses u + w (c - u) of the
        conditional and unconditional outputs (w = 1: c, w = 0: u, exactly), a learned variance c's. None: no
        guidance (N-sample output).
    """
    check_options(prediction, variance, sampler, eta)
    check_backend(backend)
    check_float_tensor("x_t", x_t, x_t.device)
    guidance = check_model_output(model_output, x_t, variance, guidance_scale, "x_t")
    tables = resolve_tables(schedule, x_t)
    step_t, step_index, known = _step_arg(step, x_t.device, tables.num_steps)
    needed = (sampler == "ddpm" or eta > 0) and known != 0
    noise, seed = noise_source(x_t, noise, generator, seed, needed)
    offset, host = offset_arg(element_offset, offset_mod4, x_t.device)
    x_t, model_output, noise, out = _layouts(x_t, model_output, noise, out)
    args = (x_t, model_output, tables.packed, step_t, step_index, noise, seed, host, offset, prediction,
            variance, bool(clip), sampler == "ddim", float(eta), out, guidance)
    if backend is None and torch.compiler.is_compiling():
        torch.ops.ddpm_fast.p_step_(*args)
    else:  # eager: skip the custom op's Python dispatch (100-200 us per call measured here, under load)
        _P_STEP_BACKENDS[backend or _auto_backend(args)](*args)
    return out


def _layouts(x_t, model_output, noise, out):
    """x_t dense (NCHW or channels_last), out and noise with its strides, model output with mergeable spatial
    dims: what every backend assumes. Copies only what does not fit (never out, which must already match)."""
    if out is None:
        x_t = x_t if is_dense(x_t) else x_t.contiguous()
        out = torch.empty_like(x_t)
    else:
        check_float_tensor("out", out, x_t.device, x_t.shape)
        if out.dtype != x_t.dtype or out.stride() != x_t.stride() or not is_dense(x_t):
            raise ValueError(f"out must match x_t's dtype and strides and be dense (contiguous or channels_last):"
                             f" x_t {x_t.dtype} {x_t.stride()}, out {out.dtype} {out.stride()}")
    if noise is not None:
        noise = match_layout(noise, x_t)
    if nc_s_strides(model_output) is None:
        model_output = model_output.contiguous()  # the kernels need one stride for the spatial dims
    return x_t, model_output, noise, out



def _auto_backend(args):
    x_t, model_output, _, _, _, noise, *_ = args
    if x_t.device.type != "cpu":
        if _ext.has_triton():
            return "triton"
        warn_no_triton()
        return "torch"
    fp32 = all(t is None or t.dtype == torch.float32 for t in (x_t, model_output, noise))
    return "cpp" if fp32 and _ext.has_cpu_kernels() else "torch"


# ---- the custom op ----------------------------------------------------------------------------------------

@torch.library.custom_op("ddpm_fast::p_step_", mutates_args=("out",), device_types=("cpu", "cuda"))
def _p_step_op(x_t: torch.Tensor, model_output: torch.Tensor, table: torch.Tensor, step: Optional[torch.Tensor],
               step_index: int, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], element_offset: int,
               offset: Optional[torch.Tensor], prediction: str, variance: str, clip: bool, ddim: bool, eta: float,
               out: torch.Tensor, guidance: Optional[torch.Tensor]) -> None:
    """Writes x_{t-1} into out. Arguments are validated by ``p_step``; element_offset and offset are what
    ``ops.noise.offset_arg`` returns (the int offset, or the offset tensor with its residue mod 4); guidance the
    guidance-scale tensor of a 2N-sample model output, or None."""
    args = (x_t, model_output, table, step, step_index, noise, seed, element_offset, offset, prediction, variance,
            clip, ddim, eta, out, guidance)
    _P_STEP_BACKENDS[_auto_backend(args)](*args)


@_p_step_op.register_fake
def _p_step_fake(x_t, model_output, table, step, step_index, noise, seed, element_offset, offset, prediction,
                 variance, clip, ddim, eta, out, guidance):
    return None



# ---- backends ---------------------------------------------------------------------------------------------

def step_coefs(c, prediction, ddim, eta):
    """Python-float coefficients of one step from a table column ``c`` (row name -> value):
    (p, q) with x0 = p x_t + q m, and (a, b, sigma) with x_{t-1} = a x0 + b x_t + sigma z."""
    p, q = {"eps": (c["sqrt_recip_alphas_cumprod"], -c["sqrt_recipm1_alphas_cumprod"]), "x0": (0.0, 1.0),
            "v": (c["sqrt_alphas_cumprod"], -c["sqrt_one_minus_alphas_cumprod"])}[prediction]
    if not ddim:
        return p, q, c["posterior_mean_coef1"], c["posterior_mean_coef2"]
    sigma = eta * c["posterior_variance"] ** 0.5
    direction = max(c["one_minus_alphas_cumprod_prev"] - sigma * sigma, 0.0) ** 0.5
    srm1 = c["sqrt_recipm1_alphas_cumprod"]
    return p, q, c["sqrt_alphas_cumprod_prev"] - direction / srm1, direction * c["sqrt_recip_alphas_cumprod"] / srm1


_HOST_COLUMNS = {}  # id(packed table) -> (weak reference to it, its columns as dicts of Python floats)


def _columns(table, rows=ROWS):
    """The columns of a packed table as dicts row name -> Python float (``rows``: its row names)."""
    entry = _HOST_COLUMNS.get(id(table))
    if entry is None or entry[0]() is not table:  # tables are read-only: convert once per table
        if len(_HOST_COLUMNS) > 64:
            _HOST_COLUMNS.clear()
        entry = _HOST_COLUMNS[id(table)] = (weakref.ref(table), [dict(zip(rows, c)) for c in table.t().tolist()])
    return entry[1]


_HOST_STEPS = {}  # (id(table), step, options) -> (weak reference to the table, _host_step's result)


def _host_step(table, step, step_index, prediction, variance, ddim, eta):
    """(step index, table column as a dict, p, q, a, b, sigma, learned) read on the host (a sync on CUDA).
    Cached per table, step and options: a sampling loop asks for the same few hundred steps again and again."""
    i = int(step) if step is not None else step_index
    key = (id(table), i, prediction, variance, ddim, eta)
    hit = _HOST_STEPS.get(key)
    if hit is not None and hit[0]() is table:
        return hit[1]
    if not 0 <= i < table.shape[1]:
        raise ValueError(f"step index {i} out of range [0, {table.shape[1]})")
    c = _columns(table)[i]
    p, q, a, b = step_coefs(c, prediction, ddim, eta)
    learned = variance == "learned_range" and not ddim
    sigma = eta * c["posterior_variance"] ** 0.5 if ddim else \
        c["fixed_large_std" if variance == "fixed_large" else "posterior_std"]
    if len(_HOST_STEPS) > 16384:
        _HOST_STEPS.clear()
    result = _HOST_STEPS[key] = (weakref.ref(table), (i, c, p, q, a, b, sigma, learned))
    return result[1]


def host_guidance(guidance, n, model_output):
    """(guided, w, offset in elements from a conditional output to its unconditional one) for the C++ kernels."""
    if guidance is None:
        return False, 1.0, 0
    return True, float(guidance), n * model_output.stride(0)


def model_prediction(model_output, n, channels, guidance):
    """The C-channel prediction a step uses, float32 (torch ops): the guided combine u + w (c - u) of a
    2N-sample output (w = 1: c, w = 0: u, exactly), or the output's first C channels."""
    c = model_output[:n, :channels].float()
    w = None if guidance is None else float(guidance)  # a host read: a sync on CUDA, as every torch-path step
    if w is None or w == 1:
        return c
    u = model_output[n:, :channels].float()
    return u if w == 0 else torch.sub(c, u).mul_(w).add_(u)


def _p_step_cpp(x_t, model_output, table, step, step_index, noise, seed, element_offset, offset, prediction,
                variance, clip, ddim, eta, out, guidance=None):
    """One C++ pass (fp32 CPU tensors, x_t/out/noise dense alike, model_output with mergeable spatial dims)."""
    ext = _ext.load()
    if ext is None or x_t.device.type != "cpu" or any(
            t is not None and t.dtype != torch.float32 for t in (x_t, model_output, noise)):
        raise ValueError("backend 'cpp' needs the compiled extension and float32 CPU tensors")
    i, c, p, q, a, b, sigma, learned = _host_step(table, step, step_index, prediction, variance, ddim, eta)
    N, C = x_t.shape[:2]
    mo_sn, mo_sc, mo_ss = nc_s_strides(model_output)
    # learned sigma = exp(0.5 * (frac log beta + (1 - frac) log post_var)), frac = (v + 1) / 2: linear in v
    lo, hi = 0.5 * c["posterior_log_variance_clipped"], 0.5 * c["log_betas"]
    ext.p_step_fused_cpu(x_t.data_ptr(), model_output.data_ptr(), 0 if noise is None else noise.data_ptr(),
                         out.data_ptr(), N, C, math.prod(x_t.shape[2:]), not x_t.is_contiguous(), mo_sn, mo_sc, mo_ss,
                         C * mo_sc, p, q, a, b, sigma, 0.5 * (hi + lo), 0.5 * (hi - lo), bool(clip), learned,
                         i > 0 and (not ddim or eta > 0), 0 if seed is None else int(seed) & _MASK64, i,
                         STREAM_P_STEP, host_offset(offset, element_offset),
                         *host_guidance(guidance, N, model_output), torch.get_num_threads())


def _p_step_torch(x_t, model_output, table, step, step_index, noise, seed, element_offset, offset, prediction,
                  variance, clip, ddim, eta, out, guidance=None):
    """In-place torch ops with Python-float coefficients (3-4 passes; reading them on CUDA syncs)."""
    i, c, p, q, a, b, sigma, learned = _host_step(table, step, step_index, prediction, variance, ddim, eta)
    N, C = x_t.shape[:2]
    xf, mf = x_t.float(), model_prediction(model_output, N, C, guidance)
    work = out if out.dtype == torch.float32 else None
    if clip:
        x0 = mf.clamp(-1, 1) if prediction == "x0" else torch.mul(xf, p).add_(mf, alpha=q).clamp_(-1, 1)
        res = torch.mul(xf, b, out=work) if work is not None else torch.mul(xf, b)
        res.add_(x0, alpha=a)
    else:  # fold x0 into one linear combination of x_t and m
        res = torch.mul(xf, a * p + b, out=work) if work is not None else torch.mul(xf, a * p + b)
        res.add_(mf, alpha=a * q)
    if i > 0 and (not ddim or eta > 0):
        z = noise.float() if noise is not None else \
            philox_noise(x_t, seed, i, STREAM_P_STEP, host_offset(offset, element_offset))
        if learned:
            lo, hi = 0.5 * c["posterior_log_variance_clipped"], 0.5 * c["log_betas"]
            sig = torch.mul(model_output[:N, C:].float(), 0.5 * (hi - lo)).add_(0.5 * (hi + lo)).exp_()
            res.addcmul_(sig, z)
        else:
            res.add_(z, alpha=sigma)
    if res is not out:
        out.copy_(res)


def _p_step_triton(*args):
    if not _ext.has_triton():
        raise ValueError("backend 'triton' needs triton installed")
    from .triton.p_step import p_step_triton
    p_step_triton(*args, stream=STREAM_P_STEP)


_P_STEP_BACKENDS = {"cpp": _p_step_cpp, "torch": _p_step_torch, "triton": _p_step_triton}
