"""The few-step solvers' fused step as one Triton kernel (DPM-Solver++ 2M/3M/SDE-2M, UniPC; diffusion/solvers.py):
read x, the model output and the history once, write x and the history:
    m    = data_prediction(x, model output)                  (model_output.py: shared by every sampler, guidance
                                                              included)
    xc   = cx x + cl last + c0 m + c1 h1 + c2 h2             (CORRECTOR: UniPC; xc = x otherwise)
    out  = a xc + b0 m + b1 h1 + b2 h2 + s z                 (NOISE: dpmpp_2m_sde)
    last = xc;  h2 = h1;  h1 = m
The coefficients are gathered from the solver's packed table at a step index read from device memory (or passed
as an argument, for graphs whose every node bakes its own step): the step's kind (first order, multistep,
corrector, final jump to sigma 0) is data in that table, so one specialisation per solver serves every step.
"""
import math

import triton
import triton.language as tl

from ...diffusion import solvers
from ..common import nc_s_strides
from .model_output import PRED_CODES, data_prediction, model_output_offsets, step_index, table_row
from .philox import launch_geometry, step_noise

NOISE_NONE, NOISE_INPUT, NOISE_PHILOX = 0, 1, 2
_CX, _CL, _C0, _C1, _C2 = (tl.constexpr(solvers.ROW[n]) for n in ("cx", "cl", "c0", "c1", "c2"))
_A, _B0, _B1, _B2, _S = (tl.constexpr(solvers.ROW[n]) for n in ("a", "b0", "b1", "b2", "s"))


@triton.jit
def _solver_step_kernel(
        x_ptr,        # x: N*C*S elements, dense, NCHW or channels-last memory order; fp32/fp16/bf16
        mo_ptr,       # model output: element (n, c, s) at n*mo_sn + c*mo_sc + s*mo_ss; GUIDED: the unconditional
                      # output of (n, c, s) at +mo_un
        noise_ptr,    # injected noise laid out like x (read when NOISE == 1)
        out_ptr,      # x after the step, laid out like x; may alias x_ptr (each element is read before written)
        h1_ptr,       # fp32, laid out like x: the previous data prediction (read, then overwritten with m)
        h2_ptr,       # fp32: the one before (HIST == 2; overwritten with h1)
        last_ptr,     # fp32: the previous corrected sample (CORRECTOR; overwritten with xc)
        tab_ptr,      # packed float32 schedule table (len(schedule.ROWS), num_steps): the data prediction's rows
        coef_ptr,     # packed float32 solver table (len(solvers.ROWS), num_steps)
        step_ptr,     # int64 step index in device memory (read when STEP_FROM_PTR)
        seed_ptr,     # int64 Philox key in device memory (read when NOISE == 2)
        offset_ptr,   # int64 element offset in device memory (read when OFFSET_FROM_PTR)
        w_ptr,        # float32 guidance scale in device memory (read when GUIDED)
        step_arg,     # the step index when not STEP_FROM_PTR
        offset_arg,   # the element offset when not OFFSET_FROM_PTR
        n_elements, C, S, mo_sn, mo_sc, mo_ss, mo_un, num_steps,
        lead,         # element_offset % 4: the launch starts this many elements early so Philox groups align
        PRED: tl.constexpr, HIST: tl.constexpr, CORRECTOR: tl.constexpr, NOISE: tl.constexpr,
        STREAM: tl.constexpr, STEP_FROM_PTR: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, MO_LIKE_X: tl.constexpr, GUIDED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * BLOCK + tl.arange(0, BLOCK) - lead
    mask = (local >= 0) & (local < n_elements)
    step = step_index(step_ptr, step_arg, num_steps, pid, STEP_FROM_PTR)

    x = tl.load(x_ptr + local, mask=mask, other=0.0).to(tl.float32)
    mo_off = model_output_offsets(local, C, S, mo_sn, mo_sc, mo_ss, CHANNELS_LAST, MO_LIKE_X)
    m = data_prediction(x, mo_ptr, mo_off, mask, tab_ptr, num_steps, step, w_ptr, mo_un, PRED, GUIDED)
    h1 = tl.load(h1_ptr + local, mask=mask, other=0.0)
    if HIST == 2:
        h2 = tl.load(h2_ptr + local, mask=mask, other=0.0)
    else:
        h2 = h1 * 0.0
    if CORRECTOR:
        last = tl.load(last_ptr + local, mask=mask, other=0.0)
        xc = table_row(coef_ptr, _CX, num_steps, step) * x + table_row(coef_ptr, _CL, num_steps, step) * last \
            + table_row(coef_ptr, _C0, num_steps, step) * m + table_row(coef_ptr, _C1, num_steps, step) * h1 \
            + table_row(coef_ptr, _C2, num_steps, step) * h2
        tl.store(last_ptr + local, xc, mask=mask)
    else:
        xc = x
    res = table_row(coef_ptr, _A, num_steps, step) * xc + table_row(coef_ptr, _B0, num_steps, step) * m \
        + table_row(coef_ptr, _B1, num_steps, step) * h1
    if HIST == 2:
        res += table_row(coef_ptr, _B2, num_steps, step) * h2
        tl.store(h2_ptr + local, h1, mask=mask)
    if NOISE != 0:
        z = step_noise(noise_ptr, local, mask, seed_ptr, offset_ptr, offset_arg, pid, step, NOISE, STREAM,
                       OFFSET_FROM_PTR, BLOCK)
        res += table_row(coef_ptr, _S, num_steps, step) * z  # s = 0 at the last step (to sigma 0): no noise
    tl.store(h1_ptr + local, m, mask=mask)
    tl.store(out_ptr + local, res.to(out_ptr.dtype.element_ty), mask=mask)


def solver_step_triton(x, model_output, table, coefs, step, step_index, noise, seed, element_offset, offset,
                       prediction, sampler, h1, h2, last, out, guidance=None, stream=0, block=None):
    """Launch the fused solver step. Arguments as ``torch.ops.ddpm_fast.solver_step_`` (validated there;
    element_offset and offset as ``ops.noise.offset_arg`` returns them; guidance the guidance-scale tensor of a
    2N-sample model output, or None), plus the Philox stream id and an optional block size (tests)."""
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    mo_sn, mo_sc, mo_ss = nc_s_strides(model_output)
    like_x = model_output.shape[1:] == x.shape[1:] and model_output.stride() == x.stride()
    stochastic = sampler in solvers.STOCHASTIC
    noise_mode = NOISE_NONE if not stochastic else NOISE_INPUT if noise is not None else NOISE_PHILOX
    grid, lead, offset_ptr, offset_arg, block = launch_geometry(x.numel(), element_offset, offset, block)
    dummy = table  # any valid pointer for arguments a specialisation never reads
    _solver_step_kernel[grid](
        x, model_output, noise if noise is not None else dummy, out, h1, h2 if h2 is not None else dummy,
        last if last is not None else dummy, table, coefs, step if step is not None else dummy,
        seed if seed is not None else dummy, offset_ptr if offset_ptr is not None else dummy,
        guidance if guidance is not None else dummy, step_index, offset_arg, x.numel(), C, S, mo_sn, mo_sc, mo_ss,
        N * mo_sn, table.shape[1], lead, PRED=PRED_CODES[prediction],
        HIST=solvers.HISTORY[sampler], CORRECTOR=sampler in solvers.CORRECTOR, NOISE=noise_mode, STREAM=stream,
        STEP_FROM_PTR=step is not None, OFFSET_FROM_PTR=offset_ptr is not None, CHANNELS_LAST=not x.is_contiguous(),
        MO_LIKE_X=like_x, GUIDED=guidance is not None, BLOCK=block)
