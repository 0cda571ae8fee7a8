"""In-kernel Gaussian noise from Philox4x32-10, shared by the q_sample, p_step and seeded-randn kernels.

The stream is a pure function of (seed, step, stream, element):
  key     = seed (64 bits, loaded from a device tensor so a captured CUDA graph replays with a new seed)
  counter = (element // 4 low word, step, stream, element // 4 high word)
One Philox call gives 4 uint32 -> 2 Box-Muller pairs -> the normals of elements 4g .. 4g+3, in that order.
The step has its own counter word, so n * steps > 2^32 cannot wrap and seed s at step k+1 never replays seed
s+1 at step k (as ``tl.randn(seed + step, offset)`` would); the stream word separates p_step noise, the initial
x_T and q_sample. "element" is the global index in the tensor's memory order plus the caller's element_offset, so
a chunk of a batch draws exactly the noise the unchunked run would.

The element offset comes either as an integer argument or from an int64 tensor in device memory (so one captured
graph serves every chunk of a batch: the sampler writes each chunk's offset before replaying). Only its residue
mod 4, the "lead", is a host-side launch argument: it fixes where the launch's first element sits in its Philox
group (the launch starts ``lead`` elements early), and keeping it on the host lets Triton specialise the common
lead 0 (16-divisible: aligned vector loads). A launch's first Philox group, offset // 4, is computed in the kernel.
"""
import triton
import triton.language as tl

from .. import device as _device
from .._ext import triton_interpret


@triton.jit
def _box_muller(u1, u2):
    """triton.language.pair_uniform_to_normal with a correctly rounded square root: tl.sqrt is the GPU's
    approximate sqrt (the interpreter's is exact), so the GPU would drift from the CPU's noise. log, cos and sin
    are libdevice's (about 1 ulp)."""
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt_rn(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _randn4(seed, group, c1, c2):
    """Four blocks of N(0, 1) from counters (group, c1, c2); group: int64 block, c1/c2: scalars."""
    lo = (group & 0xFFFFFFFF).to(tl.uint32)
    hi = (group >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, zero + c1, zero + c2, hi)
    n0, n1 = _box_muller(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = _box_muller(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def randn_block(seed, first_group, step, stream, BLOCK: tl.constexpr):
    """BLOCK normals for elements 4 * first_group ... 4 * first_group + BLOCK - 1 (float32, (BLOCK,))."""
    group = tl.arange(0, BLOCK // 4).to(tl.int64) + first_group
    n0, n1, n2, n3 = _randn4(seed, group, step.to(tl.uint32), stream)
    # join(join(n0, n2), join(n1, n3))[g, j, k] = n_{2j+k}: row-major flattening gives n0, n1, n2, n3 per group.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))


@triton.jit
def first_group(offset_ptr, offset_arg, OFFSET_FROM_PTR: tl.constexpr):
    """The launch's first Philox group (element_offset // 4) from device memory or from the integer argument."""
    if OFFSET_FROM_PTR:
        group = tl.load(offset_ptr) // 4
    else:
        group = offset_arg // 4  # an int argument (Triton may specialise it to a constant)
    return group


@triton.jit
def step_noise(noise_ptr, local, mask, seed_ptr, offset_ptr, offset_arg, pid, step, NOISE: tl.constexpr,
               STREAM: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """A sampler step's noise for the block's elements ``local``: the caller's tensor (NOISE == 1), or Philox
    normals of (seed, step, stream) at the elements' global offsets (NOISE == 2)."""
    if NOISE == 1:
        z = tl.load(noise_ptr + local, mask=mask, other=0.0).to(tl.float32)
    else:
        group = first_group(offset_ptr, offset_arg, OFFSET_FROM_PTR) + pid * (BLOCK // 4)
        z = randn_block(tl.load(seed_ptr), group, step, STREAM, BLOCK)
    return z


@triton.jit
def _seeded_randn_kernel(
        out_ptr,       # output, n_elements in memory order; fp32/fp16/bf16
        seed_ptr,      # int64 Philox key in device memory
        offset_ptr,    # int64 element offset in device memory (read when OFFSET_FROM_PTR)
        offset_arg,    # the element offset when not OFFSET_FROM_PTR
        n_elements,
        lead,          # element_offset % 4: the launch starts this many elements early so Philox groups align
        STREAM: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * BLOCK + tl.arange(0, BLOCK) - lead
    mask = (local >= 0) & (local < n_elements)
    seed = tl.load(seed_ptr)
    group = first_group(offset_ptr, offset_arg, OFFSET_FROM_PTR) + pid * (BLOCK // 4)
    z = randn_block(seed, group, pid * 0, STREAM, BLOCK)
    tl.store(out_ptr + local, z.to(out_ptr.dtype.element_ty), mask=mask)


def launch_geometry(n_elements, host, offset=None, block=None):
    """(grid, lead, offset_ptr, offset_arg, BLOCK) for an elementwise launch over n_elements.

    host, offset: the element offset as ``ops.noise.offset_arg`` returns it (the int offset, or a device tensor
    with its residue mod 4). On a GPU 1024-element blocks; under TRITON_INTERPRET one large block (each
    interpreted program costs ~30 ms).
    """
    lead = host % 4
    if block is None:
        block = min(triton.next_power_of_2(n_elements + lead), 16384) if triton_interpret() else 1024
    block = max(int(block), 16)
    grid = (triton.cdiv(n_elements + lead, block),)
    return grid, lead, offset, (0 if offset is not None else host), block


def seeded_randn_triton(seed, host, offset, out, stream, block=None):
    """Fill ``out`` (dense, any float dtype) with N(0, 1) noise of (seed, step 0, stream, element); the element
    offset as ``ops.noise.offset_arg`` returns it."""
    grid, lead, offset_ptr, offset_arg, block = launch_geometry(out.numel(), host, offset, block)
    with _device.on_device(out.device):
        _seeded_randn_kernel[grid](out, seed, seed if offset_ptr is None else offset_ptr, offset_arg, out.numel(),
                                   lead, STREAM=stream, OFFSET_FROM_PTR=offset_ptr is not None, BLOCK=block)
