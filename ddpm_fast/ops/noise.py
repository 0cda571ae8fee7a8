"""Seeded Gaussian noise as a pure function of (seed, step, stream, element): the numbers every fused op draws.

Philox4x32-10 with key = the seed and counter = (element // 4, step, stream, element // 4 >> 32), then Box-Muller,
exactly as the Triton kernels draw it (ops/triton/philox.py); ``philox_randn_ref`` is the NumPy specification,
the C++ kernel (csrc/p_step_cpu.cpp) draws the same stream on the CPU. Streams keep the uses apart: p_step's
per-step noise, the sampler's initial x_T (``seeded_randn``) and q_sample's training noise.
"""
from typing import Optional

import numpy as np
import torch

from . import _ext
from .common import check_backend, check_float_tensor, is_dense, warn_no_triton

STREAM_P_STEP, STREAM_INIT, STREAM_Q_SAMPLE = 0, 1, 2
# The largest |noise - philox_randn_ref| of any backend (C++ and Triton, CPU and GPU), in float32 output. The
# specification uses the kernels' own float32 uniforms, so only the float32 Box-Muller rounds differently: the
# angle 2 pi u rounded to float32 (<= 4.1e-7) times r <= sqrt(-2 ln 1e-7) = 5.68, plus about 1 ulp in log, sqrt,
# cos and sin: <= 2.9e-6 (measured: C++ 5e-7, Triton 1.5e-6). Tested on every backend, the GPU's included.
NOISE_ERROR_BOUND = 4e-6
_MASK64 = (1 << 64) - 1


def seed_tensor(seed, device):
    """An int64 one-element seed tensor on ``device`` from an int or a tensor (validated)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed must be an int64 tensor with one element, got {seed.dtype} {tuple(seed.shape)}")
        if seed.device != torch.device(device):
            raise ValueError(f"seed is on {seed.device} but the data is on {device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    value = seed & _MASK64  # the same 64 bits as an int64
    return torch.tensor([value - 2 ** 64 if value >= 2 ** 63 else value], dtype=torch.int64, device=device)


def offset_arg(element_offset, offset_mod4, device):
    """(offset tensor or None, host part) of an element offset after validation.

    element_offset: an int >= 0, or an int64 one-element tensor on ``device`` (read in the kernel, so one captured
    CUDA graph serves every chunk: write the chunk's offset into the tensor before each replay). The host part is
    the whole offset for an int, and ``offset % 4`` for a tensor: the launch geometry (which element of a Philox
    group of 4 a launch starts at) is decided on the host, so a graph is specific to ``offset % 4`` only. A CPU
    tensor is read here (its residue may then be omitted); a CUDA tensor needs ``offset_mod4`` (no host sync).
    """
    if not isinstance(element_offset, torch.Tensor):
        if isinstance(element_offset, bool) or not isinstance(element_offset, int) or element_offset < 0:
            raise ValueError(f"element_offset must be an int >= 0 or an int64 tensor, got {element_offset!r}")
        return None, element_offset
    if element_offset.dtype != torch.int64 or element_offset.numel() != 1:
        raise ValueError(f"element_offset must be an int or an int64 tensor with one element, got "
                         f"{element_offset.dtype} {tuple(element_offset.shape)}")
    if element_offset.device != torch.device(device):
        raise ValueError(f"element_offset is on {element_offset.device} but the data is on {device}")
    if offset_mod4 is not None and (isinstance(offset_mod4, bool) or offset_mod4 not in (0, 1, 2, 3)):
        raise ValueError(f"offset_mod4 must be 0, 1, 2 or 3 (element_offset % 4), got {offset_mod4!r}")
    if element_offset.device.type == "cpu" and not torch.compiler.is_compiling():
        value = int(element_offset)
        if value < 0 or offset_mod4 not in (None, value % 4):
            raise ValueError(f"element_offset tensor holds {value}: it must be >= 0 and agree with "
                             f"offset_mod4={offset_mod4}")
        return element_offset, value % 4
    if offset_mod4 is None:
        raise ValueError("element_offset given as a device tensor needs offset_mod4=element_offset % 4 (the "
                         "launch geometry is chosen on the host, without reading the tensor)")
    return element_offset, offset_mod4


def host_offset(offset, host):
    """The full element offset on the host (the C++ / torch backends): the tensor's value, or the int itself."""
    return host if offset is None else int(offset)


def philox4x32_10(counter, key):
    """NumPy Philox4x32-10 (Salmon et al. 2011; Random123's philox4x32 with 10 rounds): four uint32 words
    (arrays) from a counter of four uint32 words and a key of two. Tested against Random123's known answers."""
    m32 = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & m32 for c in counter)
    k0, k1 = (np.uint64(int(k) & 0xFFFFFFFF) for k in key)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c0, c1, c2, c3


def philox_randn_ref(seed, step, stream, elements):
    """NumPy specification of the in-kernel (CUDA/Triton) noise: N(0, 1) float64 for global element indices
    ``elements`` at (seed, step, stream). Philox4x32-10 with key = seed and counter = (e // 4 low word, step,
    stream, e // 4 high word) as triton.language.philox, then Box-Muller as triton.language.pair_uniform_to_normal;
    see ops/triton/philox.py for the counter layout."""
    e = np.asarray(elements, dtype=np.uint64)
    key = int(seed) & _MASK64
    group = e // np.uint64(4)
    words = philox4x32_10((group, np.full_like(e, int(step) & 0xFFFFFFFF), np.full_like(e, stream),
                           group >> np.uint64(32)), (key & 0xFFFFFFFF, key >> 32))
    # uint32 -> [0, 1): as int32, negatives folded by bitwise not, times (2^23 - 1) / 2^23 / 2^31, in float32
    # as every kernel computes it (the int -> float32 conversion and the product both round); Box-Muller from
    # these float32 uniforms in float64, so a kernel's error is its float32 log/sqrt/cos/sin rounding alone
    u = [(np.where(c >= 2 ** 31, 0xFFFFFFFF - c, c).astype(np.float32) * np.float32(4.6566127342e-10))
         .astype(np.float64) for c in words]
    lane = (e % np.uint64(4)).astype(np.int64)
    first, second = np.where(lane < 2, u[0], u[2]), np.where(lane < 2, u[1], u[3])
    r = np.sqrt(-2.0 * np.log(np.maximum(first, np.float32(1e-7))))
    return np.where(lane % 2 == 0, r * np.cos(2 * np.pi * second), r * np.sin(2 * np.pi * second))


def philox_noise(like, seed, step, stream, element_offset):
    """float32 Philox noise laid out like ``like`` (dense), on the CPU: the C++ kernel, or the NumPy
    specification when the extension is missing (slow, same numbers)."""
    buf = torch.empty_like(like, dtype=torch.float32, device="cpu")
    flat = buf.as_strided((buf.numel(),), (1,))  # memory order, for NCHW and channels_last alike
    key = int(seed) & _MASK64
    ext = _ext.load()
    if ext is not None:
        ext.philox_randn_cpu(flat.data_ptr(), flat.numel(), key, int(step) & 0xFFFFFFFF, stream, element_offset,
                             torch.get_num_threads())
    else:
        idx = np.arange(element_offset, element_offset + flat.numel(), dtype=np.uint64)
        flat.copy_(torch.from_numpy(philox_randn_ref(key, step, stream, idx)))
    return buf.to(like.device)


def noise_source(x, noise, generator, seed, needed):
    """(noise tensor or None, seed tensor or None) after checking exactly one source is given when needed."""
    given = [name for name, v in (("noise", noise), ("generator", generator), ("seed", seed)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one noise source, got {' and '.join(given)}")
    if noise is not None:
        check_float_tensor("noise", noise, x.device, x.shape)
        return noise, None
    if generator is not None:
        return (torch.randn(x.shape, generator=generator, device=x.device) if needed else None), None
    if seed is not None:
        return None, seed_tensor(seed, x.device)
    if needed:
        raise ValueError("this step adds noise: pass noise=, generator= or seed=")
    return None, None



def seeded_randn(shape, seed, *, dtype=torch.float32, device=None, element_offset=0, offset_mod4=None, out=None,
                 backend=None):
    """N(0, 1) noise that is a pure function of (seed, element): the sampler's x_T, drawn inside a graph.

    The Philox stream STREAM_INIT (step word 0), so it never collides with p_step's noise for the same seed;
    element = memory-order index + element_offset. CUDA: a Triton kernel reading the seed from device memory;
    CPU: the C++ kernel (same numbers up to float rounding).
    :param seed: int64 one-element tensor (its device is used) or an int (then ``device``, default cpu).
    :param element_offset, offset_mod4: an int, or an int64 one-element tensor read in the kernel (then
        offset_mod4 = its value % 4 on the host; required for a CUDA tensor), see ``offset_arg``.
    :param out: optional dense tensor to fill (then ``shape``/``dtype`` are ignored); no allocation.
    :param backend: as for ``p_step`` ("cpp" and "torch" both mean the host kernel here).
    """
    check_backend(backend)
    if isinstance(seed, torch.Tensor):
        device = seed.device
    device = torch.device(device if device is not None else (out.device if out is not None else "cpu"))
    seed = seed_tensor(seed, device)
    offset, host = offset_arg(element_offset, offset_mod4, device)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    check_float_tensor("out", out, device)
    if not is_dense(out):
        raise ValueError("out must be dense (contiguous or channels_last)")
    if backend is None and torch.compiler.is_compiling():
        torch.ops.ddpm_fast.seeded_randn_(seed, host, offset, STREAM_INIT, out)
    else:
        use_triton = backend == "triton" or (backend is None and device.type != "cpu")
        _seeded_randn(seed, host, offset, STREAM_INIT, out, use_triton)
    return out


def _seeded_randn(seed, host, offset, stream, out, use_triton):
    """host, offset: as returned by ``offset_arg``."""
    if use_triton and _ext.has_triton():
        from .triton.philox import seeded_randn_triton
        seeded_randn_triton(seed, host, offset, out, stream)
    else:
        if out.device.type != "cpu":
            warn_no_triton()
        out.copy_(philox_noise(out, seed, 0, stream, host_offset(offset, host)))


@torch.library.custom_op("ddpm_fast::seeded_randn_", mutates_args=("out",), device_types=("cpu", "cuda"))
def _seeded_randn_op(seed: torch.Tensor, element_offset: int, offset: Optional[torch.Tensor], stream: int,
                     out: torch.Tensor) -> None:
    """Fills out with N(0, 1) from (seed, stream, element offset); the offset as ``offset_arg`` returns it."""
    _seeded_randn(seed, element_offset, offset, stream, out, out.device.type != "cpu")


@_seeded_randn_op.register_fake
def _seeded_randn_fake(seed, element_offset, offset, stream, out):
    return None

