"""The fused reverse step as one Triton kernel: read x_t and the model output once, write x_{t-1}.

Every combination of prediction (eps / x0 / v), variance (fixed_small / fixed_large / learned_range), clip and
sampler (DDPM, DDIM with eta) is one specialisation (constexpr flags). Both samplers reduce to
    x0  = data_prediction(x_t, model output)   (model_output.py, shared by every sampler, guidance included;
                                                clipped if CLIP)
    out = a * x0 + b * x_t + [step > 0] * sigma * z
with a, b, sigma and the x0 coefficients gathered from the packed schedule table at a step index read from device
memory (or passed as an argument, for graphs whose every node bakes its own step). The element offset of the
noise likewise comes from device memory or an argument (ops/triton/philox.py).
"""
import math

import triton
import triton.language as tl

from ...diffusion.schedule import ROW
from .. import device as _device
from ..common import nc_s_strides
from .model_output import PRED_CODES, data_prediction, model_output_offsets, step_index, table_row as _row
from .philox import launch_geometry, step_noise

VAR_CODES = {"fixed_small": 0, "fixed_large": 1, "learned_range": 2}
NOISE_NONE, NOISE_INPUT, NOISE_PHILOX = 0, 1, 2

_SRA = tl.constexpr(ROW["sqrt_recip_alphas_cumprod"])
_SRM1 = tl.constexpr(ROW["sqrt_recipm1_alphas_cumprod"])
_SABP = tl.constexpr(ROW["sqrt_alphas_cumprod_prev"])
_OMABP = tl.constexpr(ROW["one_minus_alphas_cumprod_prev"])
_PVAR = tl.constexpr(ROW["posterior_variance"])
_PLV = tl.constexpr(ROW["posterior_log_variance_clipped"])
_PSTD = tl.constexpr(ROW["posterior_std"])
_C1 = tl.constexpr(ROW["posterior_mean_coef1"])
_C2 = tl.constexpr(ROW["posterior_mean_coef2"])
_LOGB = tl.constexpr(ROW["log_betas"])
_LSTD = tl.constexpr(ROW["fixed_large_std"])


@triton.jit
def _step_coefs(tab_ptr, num_steps, step, eta, VAR: tl.constexpr, DDIM: tl.constexpr):
    """(a, b, sigma) with out = a * x0 + b * x_t + sigma * z; sigma unused for learned_range."""
    if DDIM:
        # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps, eps = (x_t / sqrt(abar) - x0) / srm1.
        # Correctly rounded sqrt and division: tl.sqrt and `/` are approximate on the GPU (~2 ulp), and these
        # scalars multiply every element.
        sigma = eta * tl.sqrt_rn(_row(tab_ptr, _PVAR, num_steps, step))
        direction = tl.sqrt_rn(tl.maximum(_row(tab_ptr, _OMABP, num_steps, step) - sigma * sigma, 0.0))
        srm1 = _row(tab_ptr, _SRM1, num_steps, step)
        a = _row(tab_ptr, _SABP, num_steps, step) - tl.div_rn(direction, srm1)
        b = tl.div_rn(direction * _row(tab_ptr, _SRA, num_steps, step), srm1)
    else:
        a = _row(tab_ptr, _C1, num_steps, step)
        b = _row(tab_ptr, _C2, num_steps, step)
        if VAR == 1:
            sigma = _row(tab_ptr, _LSTD, num_steps, step)
        else:
            sigma = _row(tab_ptr, _PSTD, num_steps, step)
    return a, b, sigma


@triton.jit
def _p_step_kernel(
        x_ptr,        # x_t: N*C*S elements, dense, NCHW or channels-last memory order; fp32/fp16/bf16
        mo_ptr,       # model output: element (n, c, s) at n*mo_sn + c*mo_sc + s*mo_ss; variance half at +var_off;
                      # GUIDED: the unconditional output of (n, c, s) at +mo_un
        noise_ptr,    # injected noise laid out like x (read when NOISE == 1)
        out_ptr,      # x_{t-1} laid out like x; may alias x_ptr (each element is read before it is written)
        tab_ptr,      # packed float32 schedule table (len(ROWS), num_steps)
        step_ptr,     # int64 step index in device memory (read when STEP_FROM_PTR)
        seed_ptr,     # int64 Philox key in device memory (read when NOISE == 2)
        offset_ptr,   # int64 element offset in device memory (read when OFFSET_FROM_PTR)
        w_ptr,        # float32 guidance scale in device memory (read when GUIDED)
        step_arg,     # the step index when not STEP_FROM_PTR
        offset_arg,   # the element offset when not OFFSET_FROM_PTR
        n_elements, C, S, mo_sn, mo_sc, mo_ss, var_off, mo_un, num_steps,
        lead,         # element_offset % 4: the launch starts this many elements early so Philox groups align
        eta,
        PRED: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, DDIM: tl.constexpr, NOISE: tl.constexpr,
        STREAM: tl.constexpr, STEP_FROM_PTR: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, MO_LIKE_X: tl.constexpr, GUIDED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * BLOCK + tl.arange(0, BLOCK) - lead
    mask = (local >= 0) & (local < n_elements)
    step = step_index(step_ptr, step_arg, num_steps, pid, STEP_FROM_PTR)

    x = tl.load(x_ptr + local, mask=mask, other=0.0).to(tl.float32)
    mo_off = model_output_offsets(local, C, S, mo_sn, mo_sc, mo_ss, CHANNELS_LAST, MO_LIKE_X)
    x0 = data_prediction(x, mo_ptr, mo_off, mask, tab_ptr, num_steps, step, w_ptr, mo_un, PRED, GUIDED)
    if CLIP:
        x0 = tl.where(x0 < -1.0, -1.0, tl.where(x0 > 1.0, 1.0, x0))  # NaN stays NaN, as torch.clamp
    a, b, sigma = _step_coefs(tab_ptr, num_steps, step, eta, VAR, DDIM)
    res = a * x0 + b * x
    if NOISE != 0:
        z = step_noise(noise_ptr, local, mask, seed_ptr, offset_ptr, offset_arg, pid, step, NOISE, STREAM,
                       OFFSET_FROM_PTR, BLOCK)
        if VAR == 2 and not DDIM:
            # learned_range: v in [-1, 1] interpolates log variance between the posterior's and log beta.
            frac = (tl.load(mo_ptr + mo_off + var_off, mask=mask, other=0.0).to(tl.float32) + 1.0) * 0.5
            log_var = frac * _row(tab_ptr, _LOGB, num_steps, step) + \
                (1.0 - frac) * _row(tab_ptr, _PLV, num_steps, step)
            sigma = tl.exp(0.5 * log_var)
        # no noise at step 0: an arithmetic mask, not a branch on a device value
        res += tl.where(step > 0, sigma, 0.0) * z
    tl.store(out_ptr + local, res.to(out_ptr.dtype.element_ty), mask=mask)


def p_step_triton(x_t, model_output, table, step, step_index, noise, seed, element_offset, offset, prediction,
                  variance, clip, ddim, eta, out, guidance=None, stream=0, block=None):
    """Launch the fused step. Arguments as ``torch.ops.ddpm_fast.p_step_`` (validated there; element_offset and
    offset as ``ops.noise.offset_arg`` returns them; guidance the guidance-scale tensor of a 2N-sample model
    output, or None), plus the Philox stream id and an optional block size (tests). x_t/out/noise dense with
    equal strides; model_output any layout whose spatial dims merge into one stride (the caller makes it
    contiguous otherwise)."""
    N, C = x_t.shape[:2]
    S = math.prod(x_t.shape[2:])
    mo_sn, mo_sc, mo_ss = nc_s_strides(model_output)
    like_x = model_output.shape[1:] == x_t.shape[1:] and model_output.stride() == x_t.stride()
    need_noise = (not ddim) or eta > 0
    noise_mode = NOISE_NONE if not need_noise else NOISE_INPUT if noise is not None else NOISE_PHILOX
    grid, lead, offset_ptr, offset_arg, block = launch_geometry(x_t.numel(), element_offset, offset, block)
    channels_last = not x_t.is_contiguous()
    dummy = table  # any valid pointer for arguments a specialisation never reads
    with _device.on_device(x_t.device):
        _p_step_kernel[grid](
            x_t, model_output, noise if noise is not None else dummy, out, table,
            step if step is not None else dummy, seed if seed is not None else dummy,
            offset_ptr if offset_ptr is not None else dummy, guidance if guidance is not None else dummy, step_index,
            offset_arg, x_t.numel(), C, S, mo_sn, mo_sc, mo_ss, C * mo_sc, N * mo_sn, table.shape[1], lead,
            float(eta),
            PRED=PRED_CODES[prediction], VAR=VAR_CODES[variance], CLIP=bool(clip), DDIM=bool(ddim),
            NOISE=noise_mode, STREAM=stream, STEP_FROM_PTR=step is not None,
            OFFSET_FROM_PTR=offset_ptr is not None, CHANNELS_LAST=channels_last,
            MO_LIKE_X=like_x and variance != "learned_range", GUIDED=guidance is not None, BLOCK=block)
