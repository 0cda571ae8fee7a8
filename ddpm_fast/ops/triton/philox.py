"""In-kernel Gaussian noise from Philox4x32-10, shared by the q_sample, p_step and seeded-randn kernels.

The stream is a pure function of (seed, step, stream, element):
  key     = seed (64 bits, loaded from a device tensor so a captured CUDA graph replays with a new seed)
  counter = (element // 4 low word, step, stream, element // 4 high word)
One Philox call gives 4 uint32 -> 2 Box-Muller pairs -> the normals of elements 4g .. 4g+3, in that order.
The step has its own counter word, so n * steps > 2^32 cannot wrap and seed s at step k+1 never replays seed
s+1 at step k (as ``tl.randn(seed + step, offset)`` would); the stream word separates p_step noise, the initial
x_T and q_sample. "element" is the global index in the tensor's memory order plus the caller's element_offset, so
a chunk of a batch draws exactly the noise the unchunked run would.
"""
import triton
import triton.language as tl

from .._ext import triton_interpret


@triton.jit
def _randn4(seed, group, c1, c2):
    """Four blocks of N(0, 1) from counters (group, c1, c2); group: int64 block, c1/c2: scalars."""
    lo = (group & 0xFFFFFFFF).to(tl.uint32)
    hi = (group >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, zero + c1, zero + c2, hi)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def randn_block(seed, first_group, step, stream, BLOCK: tl.constexpr):
    """BLOCK normals for elements 4 * first_group ... 4 * first_group + BLOCK - 1 (float32, (BLOCK,))."""
    group = tl.arange(0, BLOCK // 4).to(tl.int64) + first_group
    n0, n1, n2, n3 = _randn4(seed, group, step.to(tl.uint32), stream)
    # join(join(n0, n2), join(n1, n3))[g, j, k] = n_{2j+k}: row-major flattening gives n0, n1, n2, n3 per group.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))


@triton.jit
def _seeded_randn_kernel(
        out_ptr,       # output, n_elements in memory order; fp32/fp16/bf16
        seed_ptr,      # int64 Philox key in device memory
        n_elements,
        lead,          # element_offset % 4: the launch starts this many elements early so Philox groups align
        group_start,   # element_offset // 4
        STREAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    local = pid * BLOCK + tl.arange(0, BLOCK) - lead
    mask = (local >= 0) & (local < n_elements)
    seed = tl.load(seed_ptr)
    z = randn_block(seed, group_start + pid * (BLOCK // 4), pid * 0, STREAM, BLOCK)
    tl.store(out_ptr + local, z.to(out_ptr.dtype.element_ty), mask=mask)


def launch_geometry(n_elements, element_offset, block=None):
    """(grid, lead, group_start, BLOCK) for an elementwise launch over n_elements starting at element_offset.

    On a GPU 1024-element blocks; under TRITON_INTERPRET one large block (each interpreted program costs ~30 ms).
    """
    lead, group_start = element_offset % 4, element_offset // 4
    if block is None:
        block = min(triton.next_power_of_2(n_elements + lead), 16384) if triton_interpret() else 1024
    block = max(int(block), 16)
    return (triton.cdiv(n_elements + lead, block),), lead, group_start, block


def seeded_randn_triton(seed, element_offset, out, stream, block=None):
    """Fill ``out`` (dense, any float dtype) with N(0, 1) noise of (seed, step 0, stream, element)."""
    grid, lead, group_start, block = launch_geometry(out.numel(), element_offset, block)
    _seeded_randn_kernel[grid](out, seed, out.numel(), lead, group_start, STREAM=stream, BLOCK=block)
