"""Fused forward noising as one Triton kernel: x_t = sqrt(abar[t_n]) x_0 + sqrt(1 - abar[t_n]) eps, with eps
drawn in the kernel (Philox, stream Q_SAMPLE) and written out as the loss target, or read when injected."""
import triton
import triton.language as tl

from ...diffusion.schedule import ROW
from .. import device as _device
from .philox import first_group, launch_geometry, randn_block

_SAB = tl.constexpr(ROW["sqrt_alphas_cumprod"])
_S1MAB = tl.constexpr(ROW["sqrt_one_minus_alphas_cumprod"])


@triton.jit
def _q_sample_kernel(
        x_ptr,        # x_0: N * per_sample elements, dense with the batch outermost; fp32/fp16/bf16
        t_ptr,        # int64 (N,) step indices
        noise_ptr,    # injected eps laid out like x (read when INJECTED)
        xt_ptr,       # x_t out, laid out like x
        eps_ptr,      # eps out, laid out like x (written when not INJECTED)
        tab_ptr,      # packed float32 schedule table (len(ROWS), num_steps)
        seed_ptr,     # int64 Philox key in device memory (read when not INJECTED)
        n_elements, per_sample, num_steps,
        offset_arg,   # the element offset
        lead,         # element_offset % 4: the launch starts this many elements early so Philox groups align
        INJECTED: tl.constexpr, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * BLOCK + tl.arange(0, BLOCK) - lead
    mask = (local >= 0) & (local < n_elements)
    t = tl.load(t_ptr + local // per_sample, mask=mask, other=0)
    # Clamped for memory safety only: t on the CPU is range-checked by the Python layer.
    t = tl.minimum(tl.maximum(t, 0), num_steps - 1)
    sab = tl.load(tab_ptr + _SAB * num_steps + t, mask=mask, other=0.0)
    s1mab = tl.load(tab_ptr + _S1MAB * num_steps + t, mask=mask, other=0.0)
    x = tl.load(x_ptr + local, mask=mask, other=0.0).to(tl.float32)
    if INJECTED:
        z = tl.load(noise_ptr + local, mask=mask, other=0.0).to(tl.float32)
    else:
        group = first_group(seed_ptr, offset_arg, False) + pid * (BLOCK // 4)
        z = randn_block(tl.load(seed_ptr), group, pid * 0, STREAM, BLOCK)
        tl.store(eps_ptr + local, z.to(eps_ptr.dtype.element_ty), mask=mask)
    tl.store(xt_ptr + local, (sab * x + s1mab * z).to(xt_ptr.dtype.element_ty), mask=mask)


def q_sample_triton(x_start, t, table, noise, seed, element_offset, x_t_out, eps_out, stream, block=None):
    """Launch the fused q_sample. Arguments as ``torch.ops.ddpm_fast.q_sample_`` (validated there): x_start,
    noise, x_t_out and eps_out dense with equal strides and the batch outermost."""
    grid, lead, _, offset_arg, block = launch_geometry(x_start.numel(), element_offset, None, block)
    dummy = table  # a valid pointer for arguments a specialisation never reads
    with _device.on_device(x_start.device):
        _q_sample_kernel[grid](
            x_start, t, noise if noise is not None else dummy, x_t_out, eps_out if eps_out is not None else dummy,
            table, seed if seed is not None else dummy, x_start.numel(), x_start[0].numel(), table.shape[1],
            offset_arg, lead, INJECTED=noise is not None, STREAM=stream, BLOCK=block)
