"""How every fused sampler kernel reads its step and the model: the step index (``step_index``), where an
element's model output lives, and ONE function that
turns it into the data prediction x_0 (``data_prediction``), shared by the DDPM/DDIM step and the few-step
solvers. Classifier-free guidance lives here too, for every sampler at once: with GUIDED the model ran on 2N
samples (the conditional outputs first), an element's conditional value c is at ``mo_off`` and its unconditional
value u at ``mo_off + mo_un``, and the prediction the step uses is u + w (c - u), w read from device memory (so a
captured graph replays with any w); w = 1 gives c and w = 0 gives u exactly (diffusion.guided_model_output is the
specification).
"""
import triton
import triton.language as tl

from ...diffusion.schedule import ROW

_SAB = tl.constexpr(ROW["sqrt_alphas_cumprod"])
_S1MAB = tl.constexpr(ROW["sqrt_one_minus_alphas_cumprod"])
_SRA = tl.constexpr(ROW["sqrt_recip_alphas_cumprod"])
_SRM1 = tl.constexpr(ROW["sqrt_recipm1_alphas_cumprod"])

PRED_CODES = {"eps": 0, "x0": 1, "v": 2}


@triton.jit
def step_index(step_ptr, step_arg, num_steps, pid, STEP_FROM_PTR: tl.constexpr):
    """The step index from device memory (a captured graph replays it with a new value) or the integer argument,
    clamped to the table for memory safety only: the Python layer validates every step it can see without a
    device sync."""
    if STEP_FROM_PTR:
        step = tl.load(step_ptr)
    else:
        step = pid * 0 + step_arg
    return tl.minimum(tl.maximum(step, 0), num_steps - 1)


@triton.jit
def table_row(tab_ptr, row, num_steps, step):
    """Row ``row`` of a packed (rows, num_steps) table at step index ``step``."""
    return tl.load(tab_ptr + row * num_steps + step)


@triton.jit
def model_output_offsets(local, C, S, mo_sn, mo_sc, mo_ss, CHANNELS_LAST: tl.constexpr, MO_LIKE_X: tl.constexpr):
    """Offsets into the model output of x's elements ``local`` (memory order of a dense NCHW or channels-last
    x): element (n, c, s) at n*mo_sn + c*mo_sc + s*mo_ss."""
    if MO_LIKE_X:
        mo_off = local
    else:
        if CHANNELS_LAST:
            c = local % C
            s = (local // C) % S
        else:
            s = local % S
            c = (local // S) % C
        mo_off = (local // (C * S)) * mo_sn + c * mo_sc + s * mo_ss
    return mo_off


@triton.jit
def predict_x0(x, m, tab_ptr, num_steps, step, PRED: tl.constexpr):
    """x_0 from x_t and the model's C-channel prediction m (fp32 blocks) of kind PRED (eps / x0 / v)."""
    if PRED == 0:
        x0 = table_row(tab_ptr, _SRA, num_steps, step) * x - table_row(tab_ptr, _SRM1, num_steps, step) * m
    elif PRED == 1:
        x0 = m
    else:
        x0 = table_row(tab_ptr, _SAB, num_steps, step) * x - table_row(tab_ptr, _S1MAB, num_steps, step) * m
    return x0


@triton.jit
def model_prediction(mo_ptr, mo_off, mask, w_ptr, mo_un, GUIDED: tl.constexpr):
    """The model's prediction (fp32 block) at ``mo_off``: the guided combine when GUIDED, else the output."""
    m = tl.load(mo_ptr + mo_off, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        w = tl.load(w_ptr)
        u = tl.load(mo_ptr + mo_off + mo_un, mask=mask, other=0.0).to(tl.float32)
        m = tl.where(w == 1.0, m, tl.where(w == 0.0, u, u + w * (m - u)))
    return m


@triton.jit
def data_prediction(x, mo_ptr, mo_off, mask, tab_ptr, num_steps, step, w_ptr, mo_un, PRED: tl.constexpr,
                    GUIDED: tl.constexpr):
    """The data prediction x_0 (unclipped, fp32) at x_t (fp32 block) from the model output at ``mo_off`` (and,
    GUIDED, the unconditional output at ``mo_off + mo_un`` with the guidance scale at ``w_ptr``)."""
    m = model_prediction(mo_ptr, mo_off, mask, w_ptr, mo_un, GUIDED)
    return predict_x0(x, m, tab_ptr, num_steps, step, PRED)
