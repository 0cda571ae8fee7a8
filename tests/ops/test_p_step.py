"""The fused reverse step: every backend vs the reference for every combination, its noise, its contracts."""
import itertools

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.ops import _ext
from ddpm_fast.ops.noise import NOISE_ERROR_BOUND, STREAM_INIT, STREAM_P_STEP, philox_randn_ref, seeded_randn
from ddpm_fast.ops.p_step import p_step, p_step_ref

HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.triton_cpu  # the Triton interpreter on CPU tensors (conftest.py)
needs_ext = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the compiled extension")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "torch", pytest.param("triton", marks=needs_triton)]
COMBOS = list(itertools.product(["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"], [False, True],
                                [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.6)]))
ATOL = {torch.float32: 2e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}
SCHED = NoiseSchedule.linear(100).respace(10)
NOISE_ATOL = NOISE_ERROR_BOUND  # |noise - philox_randn_ref| of every backend (derived in ops/noise.py)


def _inputs(shape, variance, dtype, device="cpu", gen=None):
    N, C = shape[:2]
    x = torch.randn(shape, generator=gen).to(device, dtype) * 1.5
    mo = torch.randn((N, 2 * C if variance == "learned_range" else C, *shape[2:]), generator=gen)
    if variance == "learned_range":
        mo[:, C:] = torch.rand(shape, generator=gen) * 2 - 1
    return x, mo.to(device, dtype), torch.randn(shape, generator=gen).to(device, dtype)


def _truncate_bf16(t):
    # The Triton interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest): its naive twin.
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


def assert_rule(out, x, mo, z, step, pred, var, clip, sampler, eta, what=""):
    """|out - ref64| <= 2 |ref(dtype) - ref64| + atol: the reference in float64 and in the input dtype."""
    kw = dict(prediction=pred, variance=var, clip=clip, sampler=sampler, eta=eta)
    ref64 = p_step_ref(SCHED, mo.double(), x.double(), step, noise=z.double(), **kw)
    naive = p_step_ref(SCHED, mo, x, step, noise=z, **kw)
    if what == "triton" and x.dtype == torch.bfloat16 and _ext.triton_interpret():
        naive = _truncate_bf16(p_step_ref(SCHED, mo.float(), x.float(), step, noise=z.float(), **kw))
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (naive.double() - ref64).abs().max().item() + ATOL[x.dtype]
    assert err <= bound, f"{what} {kw} step={step}: error {err:.3g} > {bound:.3g}"
    assert out.dtype == x.dtype and out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_combination_matches_reference(seed, backend, dtype):
    if backend == "cpp" and dtype != torch.float32:
        pytest.skip("the C++ kernel is fp32; other dtypes take the torch path")
    steps = (0, 6) if dtype == torch.float32 else (6,)
    for (pred, var, clip, (sampler, eta)), step in itertools.product(COMBOS, steps):
        x, mo, z = _inputs((2, 3, 5, 7), var, dtype)
        out = p_step(SCHED, mo, x, step, prediction=pred, variance=var, clip=clip, sampler=sampler, eta=eta,
                     noise=z, backend=backend)
        assert_rule(out, x, mo, z, step, pred, var, clip, sampler, eta, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_step_tensor_and_in_place(seed, backend):
    """channels_last x, a strided (sliced) model output, a step in a tensor, and out= aliasing x_t."""
    for pred, var in (("eps", "learned_range"), ("v", "fixed_large"), ("x0", "fixed_small")):
        x, mo, z = _inputs((3, 4, 5, 6), var, torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        big = torch.randn(3, mo.shape[1] + 2, 5, 9)
        big[:, 1:-1, :, 2:8] = mo
        mo_strided = big[:, 1:-1, :, 2:8]
        kw = dict(prediction=pred, variance=var, clip=True, noise=z, backend=backend)
        want = p_step(SCHED, mo, x.contiguous(), 7, **kw)
        got = p_step(SCHED, mo_strided, x, torch.tensor(7), **kw)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert_rule(got, x, mo, z, 7, pred, var, True, "ddpm", 0.0)
        buf = x.clone()
        assert p_step(SCHED, mo.contiguous(memory_format=torch.channels_last), buf, 7, out=buf, **kw) is buf
        torch.testing.assert_close(buf, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_noise_at_step_zero(seed, backend):
    x, mo, z = _inputs((2, 3, 4, 4), "learned_range", torch.float32)
    for var in ("fixed_small", "fixed_large", "learned_range"):
        m = mo if var == "learned_range" else mo[:, :3]
        a = p_step(SCHED, m, x, 0, variance=var, noise=z, backend=backend)
        b = p_step(SCHED, m, x, 0, variance=var, noise=z * 1000, backend=backend)
        c = p_step(SCHED, m, x, torch.tensor([0]), variance=var, seed=seed, backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_semantics(seed, backend):
    """Same seed repeats; seeds, steps, and (seed s, step k+1) vs (seed s+1, step k) all differ."""
    x, mo, _ = _inputs((4, 3, 32, 32), "fixed_small", torch.float32)  # 12288 samples: 6 sigma = 0.054

    def noise_of(s, k):
        base = p_step(SCHED, mo, x, k, noise=torch.zeros_like(x), backend=backend)
        got = p_step(SCHED, mo, x, k, seed=s, backend=backend)
        return ((got - base) / SCHED.tables().posterior_std[k]).flatten()

    s = seed % 2 ** 62
    a = noise_of(s, 4)
    torch.testing.assert_close(noise_of(s, 4), a, rtol=0, atol=0)
    bound = 6 / a.numel() ** 0.5  # 6 sigma of a sample correlation of independent normals: fails ~2e-9 by chance
    for other in (noise_of(s + 1, 4), noise_of(s, 5)):
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < bound
    b, c = noise_of(s, 5), noise_of(s + 1, 4)
    assert abs(float(torch.corrcoef(torch.stack([b, c]))[0, 1])) < bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_the_specified_philox_stream(seed, backend):
    """Every backend's seeded noise (p_step and seeded_randn) equals the NumPy Philox specification element by
    element, also at offsets that are not a multiple of 4 and past 2^32 Philox counters: CPU and GPU agree."""
    s = seed % 2 ** 63
    x, mo, _ = _inputs((2, 3, 5, 5), "fixed_small", torch.float32)
    std = SCHED.tables().posterior_std[3].item()
    for offset in (0, 75, 2 ** 34 + 3):
        base = p_step(SCHED, mo, x, 3, noise=torch.zeros_like(x), backend=backend)
        got = p_step(SCHED, mo, x, 3, seed=s, element_offset=offset, backend=backend)
        z = ((got - base) / std).flatten().double().numpy()
        want = philox_randn_ref(s, 3, STREAM_P_STEP, np.arange(x.numel()) + offset)
        # plus the float32 rounding of got and base (half an ulp each), divided by the noise's std
        rounding = 2 ** -24 * (got.abs() + base.abs()).max().item() / std
        np.testing.assert_allclose(z, want, rtol=0, atol=NOISE_ATOL + 2 * rounding)
        init = seeded_randn((2, 3, 5, 5), s, element_offset=offset, backend=backend)
        np.testing.assert_allclose(init.flatten().numpy(), philox_randn_ref(s, 0, STREAM_INIT,
                                                                            np.arange(150) + offset),
                                   rtol=0, atol=NOISE_ATOL)


# Random123's published known-answer vectors of Philox4x32-10: (counter, key, output), 32-bit words.
PHILOX_KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
              ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
              ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
               (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def _kat_normals(ctr, key, words):
    """(seed, step, stream, first element, the 4 normals the KAT words give): the counter as the kernels lay it
    out (element // 4 low word, step, stream, element // 4 high word), Box-Muller as the spec."""
    from ddpm_fast.ops import noise
    group = ctr[3] << 32 | ctr[0]
    seed = key[1] << 32 | key[0]
    u = [np.float64(np.float32(w ^ 0xFFFFFFFF if w >= 2 ** 31 else w) * np.float32(4.6566127342e-10))
         for w in words]
    r = [np.sqrt(-2 * np.log(max(u[0], np.float32(1e-7)))), np.sqrt(-2 * np.log(max(u[2], np.float32(1e-7))))]
    normals = [r[0] * np.cos(2 * np.pi * u[1]), r[0] * np.sin(2 * np.pi * u[1]),
               r[1] * np.cos(2 * np.pi * u[3]), r[1] * np.sin(2 * np.pi * u[3])]
    assert noise.philox4x32_10(ctr, key) == tuple(np.uint64(w) for w in words)
    return seed, ctr[1], ctr[2], 4 * group, np.array(normals)


@pytest.mark.parametrize("kat", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(kat):
    """The NumPy reference is Philox4x32-10 (Random123's known answers), and its noise maps the counter words as
    the kernels do; every backend draws those normals where its arguments can express the counter (the all-ones
    counter needs an element index beyond int64)."""
    from ddpm_fast.ops import noise
    seed, step, stream, first, want = _kat_normals(*kat)
    if first >= 2 ** 63:
        return  # the words are checked; no element index reaches this counter
    np.testing.assert_allclose(philox_randn_ref(seed, step, stream, first + np.arange(4)), want, rtol=0, atol=0)
    if _ext.has_cpu_kernels():
        got = noise.philox_noise(torch.empty(4), seed, step, stream, first).double().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=NOISE_ATOL)
    if _ext.has_triton() and _ext.triton_interpret():  # on a GPU machine: test_cuda_noise_is_the_specified_stream
        np.testing.assert_allclose(_triton_kat(seed, step, stream, first), want, rtol=0, atol=NOISE_ATOL)


if _ext.has_triton():
    import triton
    import triton.language as tl
    from ddpm_fast.ops.triton.philox import randn_block

    @triton.jit
    def _kat_kernel(out_ptr, seed_ptr, group, step, STREAM: tl.constexpr):
        z = randn_block(tl.load(seed_ptr), group, step, STREAM, 16)
        tl.store(out_ptr + tl.arange(0, 16), z)


def _triton_kat(seed, step, stream, first):
    """The four normals of Philox group first // 4 from the kernels' own randn_block (any step and stream)."""
    out = torch.empty(16)
    _kat_kernel[(1,)](out, torch.tensor([seed - 2 ** 64 if seed >= 2 ** 63 else seed]), first // 4, step,
                      STREAM=stream)
    return out[:4].double().numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
def test_chunks_draw_the_noise_of_the_full_batch(seed, backend, variance):
    """A batch sampled in chunks (element_offset = first sample * C*H*W) gets the unchunked run's noise, bitwise:
    75 elements per sample are not 4- or 8-aligned, so chunk edges fall inside Philox groups and vector lanes."""
    x, mo, _ = _inputs((5, 3, 5, 5), variance, torch.float32)
    kw = dict(variance=variance, seed=seed, backend=backend)
    full = p_step(SCHED, mo, x, torch.tensor([8]), **kw)
    for lo, hi in ((0, 1), (1, 4), (4, 5)):
        part = p_step(SCHED, mo[lo:hi], x[lo:hi], torch.tensor([8]), element_offset=lo * 75, **kw)
        torch.testing.assert_close(part, full[lo:hi], rtol=0, atol=0)
    init = seeded_randn((5, 3, 5, 5), seed, backend=backend)
    torch.testing.assert_close(seeded_randn((3, 3, 5, 5), seed, element_offset=150, backend=backend), init[2:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_offset_read_from_a_tensor(seed, backend):
    """element_offset as an int64 tensor (what a captured graph replays with a new value) draws exactly the int
    offset's noise, for every residue mod 4 and past 2^32 Philox groups; the value is read from the tensor at
    each call, not remembered (the same tensor, rewritten, gives the next chunk's noise)."""
    x, mo, _ = _inputs((2, 3, 5, 5), "fixed_small", torch.float32)
    offset_t = torch.zeros(1, dtype=torch.int64)
    s = seed % 2 ** 63
    for offset in (0, 75, 150, 2 ** 34 + 3):
        offset_t.fill_(offset)
        want = p_step(SCHED, mo, x, 4, seed=s, element_offset=offset, backend=backend)
        got = p_step(SCHED, mo, x, 4, seed=s, element_offset=offset_t, offset_mod4=offset % 4, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        init = seeded_randn((2, 3, 5, 5), s, element_offset=offset, backend=backend)
        torch.testing.assert_close(seeded_randn((2, 3, 5, 5), s, element_offset=offset_t, backend=backend), init,
                                   rtol=0, atol=0)


@needs_triton
def test_triton_reads_the_group_from_the_tensor_and_the_lead_from_the_host(seed):
    """The Triton kernels take only offset % 4 from the host (the launch geometry) and the Philox group
    (offset // 4) from device memory: a tensor holding offset + 4k with the host residue of offset draws the
    noise of offset + 4k, so a graph captured for one chunk replays correctly for any chunk of the same residue."""
    from ddpm_fast.ops.noise import offset_arg
    from ddpm_fast.ops.triton.philox import seeded_randn_triton
    s = seed % 2 ** 63
    out = torch.empty(3, 5, 7)
    for offset in (1, 2 ** 33 + 2):
        for k in (0, 7, 2 ** 31):
            tensor, host = offset_arg(torch.tensor([offset + 4 * k]), offset % 4, "cpu")
            seeded_randn_triton(torch.tensor([s]), host, tensor, out, STREAM_INIT)
            want = philox_randn_ref(s, 0, STREAM_INIT, np.arange(out.numel()) + offset + 4 * k)
            np.testing.assert_allclose(out.flatten().numpy(), want, atol=2e-5)


@needs_triton
def test_triton_at_the_gpu_block_size(seed, monkeypatch):
    """The interpreter normally runs one large block; the GPU runs 1024-element blocks. At 1024 (monkeypatched in
    as on a GPU), with several programs, offsets that are not 4-aligned, a channels_last x, a strided learned-range
    output and offsets from a tensor, the Triton step gives bitwise the one-block results and the spec's noise."""
    from ddpm_fast.ops.triton import philox
    x, mo, _ = _inputs((3, 5, 17, 19), "learned_range", torch.float32)   # 4845 elements: 5 blocks of 1024
    x = x.contiguous(memory_format=torch.channels_last)
    s = seed % 2 ** 63
    big = torch.randn(3, 10, 17, 23)
    big[:, :, :, 2:21] = mo
    runs = {}
    for gpu_blocks in (False, True):
        monkeypatch.setattr(philox, "triton_interpret", lambda: not gpu_blocks)
        for offset in (0, 75, 2 ** 34 + 3):
            kw = dict(variance="learned_range", seed=s, backend="triton")
            runs[gpu_blocks, offset] = (
                p_step(SCHED, big[:, :, :, 2:21], x, 6, element_offset=offset, **kw),
                p_step(SCHED, mo, x, torch.tensor([6]), element_offset=torch.tensor([offset]), **kw),
                seeded_randn((4845,), s, element_offset=offset, backend="triton"))
    for offset in (0, 75, 2 ** 34 + 3):
        for one_block, gpu_block in zip(runs[False, offset], runs[True, offset]):
            torch.testing.assert_close(gpu_block, one_block, rtol=0, atol=0)
        want = philox_randn_ref(s, 0, STREAM_INIT, np.arange(4845) + offset)
        np.testing.assert_allclose(runs[True, offset][2].double().numpy(), want, rtol=0, atol=NOISE_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [True, False])
def test_non_finite_values_propagate(seed, backend, clip):
    """NaN in x_t or the model output and inf in x_t must reach x_{t-1} (clipping x0 must not hide a NaN, as
    torch.clamp in the reference does not): the sampler's one finiteness check at the end relies on it."""
    x, mo, _ = _inputs((2, 3, 7, 9), "fixed_small", torch.float32)
    x[0, 1, 2, 3], mo[1, 2, 4, 5], x[1, 0, 0, 0] = float("nan"), float("nan"), float("inf")
    out = p_step(SCHED, mo, x, 5, variance="fixed_small", clip=clip, seed=seed, backend=backend)
    assert out[0, 1, 2, 3].isnan() and out[1, 2, 4, 5].isnan()
    assert not torch.isfinite(out[1, 0, 0, 0])
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 1, 2, 3] = mask[1, 2, 4, 5] = mask[1, 0, 0, 0] = False
    assert torch.isfinite(out[mask]).all()


@needs_ext
@pytest.mark.skipif(not getattr(_ext.load(), "with_openmp", False), reason="the extension was built without OpenMP")
def test_cpu_kernels_on_two_threads(seed):
    """The C++ kernels split work over threads only above 16384 elements per thread: 2 threads need >= 32768.
    At 3 x 5 x 67 x 71 = 71355 elements (odd, so tiles and vector tails split unevenly) the 2-thread step matches
    the reference and is bitwise the 1-thread step, noise included; so is seeded_randn."""
    x, mo, z = _inputs((3, 5, 67, 71), "learned_range", torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            kw = dict(prediction="v", variance="learned_range", backend="cpp")
            runs.append((p_step(SCHED, mo, x, 5, seed=seed, element_offset=3, **kw),
                         p_step(SCHED, mo, x, 5, noise=z, **kw),
                         seeded_randn((x.numel(),), seed, element_offset=3, backend="cpp")))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert_rule(runs[1][1], x, mo, z, 5, "v", "learned_range", True, "ddpm", 0.0, "cpp 2 threads")
    want = philox_randn_ref(seed, 0, STREAM_INIT, np.arange(x.numel()) + 3)
    np.testing.assert_allclose(runs[1][2].double().numpy(), want, rtol=0, atol=NOISE_ATOL)


def _stats_ok(z, name):
    n = z.numel()
    z = z.double().flatten()
    assert abs(z.mean().item()) < 6 / n ** 0.5, f"{name}: mean {z.mean().item()}"
    assert abs(z.var().item() - 1) < 6 * (2 / n) ** 0.5, f"{name}: var {z.var().item()}"
    ks = (torch.special.ndtr(z.sort().values) - (torch.arange(n) + 0.5) / n).abs().max().item()
    assert ks < 2.4 / n ** 0.5, f"{name}: KS statistic {ks}"  # p ~ 5e-5 for a true N(0, 1)
    for lag in (1, 2, 3, 4, 5, 64):  # neighbours within and across Philox groups
        r = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(r) < 6 / n ** 0.5, f"{name}: lag-{lag} correlation {r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(seed, backend):
    n = 1 << 15
    s = seed % 2 ** 62
    init = seeded_randn((n,), s, backend=backend)
    _stats_ok(init, f"{backend} seeded_randn")
    x = torch.zeros(1, 1, n)
    zeros = torch.zeros_like(x)
    std = SCHED.tables().posterior_std
    steps = {}
    for k, sd in ((5, s), (6, s), (5, s + 1)):
        base = p_step(SCHED, zeros, x, k, noise=zeros, clip=False, backend=backend)
        steps[k, sd] = ((p_step(SCHED, zeros, x, k, seed=sd, clip=False, backend=backend) - base) / std[k]).flatten()
        _stats_ok(steps[k, sd], f"{backend} step {k}")
    pairs = [(steps[5, s], steps[6, s]), (steps[6, s], steps[5, s + 1]), (steps[5, s], init)]
    for a, b in pairs:  # across steps, seeds, and the x_T stream
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / n ** 0.5


def test_generator_path_matches_diffusers(seed):
    """The fused CPU step with a torch.Generator reproduces DDPMScheduler.step with the same generator."""
    diffusers = pytest.importorskip("diffusers")
    for pred, dpred, var in (("eps", "epsilon", "fixed_small"), ("v", "v_prediction", "fixed_large")):
        theirs = diffusers.DDPMScheduler(num_train_timesteps=100, variance_type=var, prediction_type=dpred,
                                         timestep_spacing="leading")
        theirs.set_timesteps(10)
        ours = NoiseSchedule.linear(100).respace(10, "leading")
        x, mo, _ = _inputs((2, 3, 8, 8), var, torch.float32)
        for i in (9, 5, 1, 0):
            want = theirs.step(mo, int(ours.timesteps[i]), x,
                               generator=torch.Generator().manual_seed(seed)).prev_sample
            got = p_step(ours, mo, x, i, prediction=pred, variance=var,
                         generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        # a whole chain with one generator each: both draw noise at the same steps, so the streams stay aligned
        g_theirs, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for i in reversed(range(10)):
            m = torch.tanh(x)
            want = theirs.step(m, int(ours.timesteps[i]), x, generator=g_theirs).prev_sample
            got = p_step(ours, m, x, i, prediction=pred, variance=var, generator=g_ours)
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
            x = want
        torch.testing.assert_close(g_ours.get_state(), g_theirs.get_state())


def test_opcheck():
    x, mo, z = _inputs((2, 3, 4, 4), "learned_range", torch.float32)
    table = SCHED.tables().packed
    for step, noise, seed_t, offset in ((torch.tensor([4]), z, None, None), (None, None, torch.tensor([7]), None),
                                        (None, None, torch.tensor([7]), torch.tensor([9]))):
        torch.library.opcheck(torch.ops.ddpm_fast.p_step_.default,
                              (x, mo, table, step, 4, noise, seed_t, 1 if offset is not None else 0, offset, "v",
                               "learned_range", True, False, 0.0, torch.empty_like(x), None))
    for host, offset in ((5, None), (1, torch.tensor([5]))):
        torch.library.opcheck(torch.ops.ddpm_fast.seeded_randn_.default, (torch.tensor([3]), host, offset,
                                                                           STREAM_INIT, torch.empty(2, 3)))


def test_bad_inputs():
    x, mo, z = _inputs((2, 3, 4, 4), "fixed_small", torch.float32)
    cases = [
        (dict(model_output=torch.randn(2, 6, 4, 4)), r"model_output must have shape \(2, 3, 4, 4\)"),
        (dict(variance="learned_range"), r"model_output must have shape \(2, 6, 4, 4\)"),
        (dict(x_t=x.double()), "x_t must be float32, float16 or bfloat16"),
        (dict(x_t=x.long()), "x_t must be float32"),
        (dict(step=10), r"step index 10 out of range \[0, 10\)"),
        (dict(step=-1), "out of range"),
        (dict(step=torch.tensor([1.0])), "int64"),
        (dict(step=torch.tensor([1, 2])), "one element"),
        (dict(step=2.0), "step must be an int"),
        (dict(noise=None), "pass noise=, generator= or seed="),
        (dict(seed=3), "one noise source"),
        (dict(noise=torch.randn(2, 3, 4)), "noise must have shape"),
        (dict(noise=None, seed=torch.tensor([1.5])), "seed must be an int64"),
        (dict(noise=None, seed="7"), "seed must be an int"),
        (dict(prediction="score"), "prediction"),
        (dict(variance="learned"), "variance"),
        (dict(sampler="euler"), "sampler"),
        (dict(sampler="ddim", eta=-0.1), "eta"),
        (dict(sampler="ddim", eta=float("nan")), "eta"),
        (dict(eta=0.5), "eta applies to sampler='ddim' only"),
        (dict(element_offset=-4), "element_offset"),
        (dict(out=torch.empty(2, 3, 4, 4, dtype=torch.float16)), "out must match x_t"),
        (dict(out=torch.empty(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)), "out must match"),
        (dict(out=torch.empty(2, 3, 4)), "out must have shape"),
        (dict(schedule="linear"), "schedule must be a NoiseSchedule"),
        (dict(schedule=SCHED.tables("cpu", torch.float64)), "float32 tables"),
        (dict(backend="cuda"), "backend"),
        (dict(x_t=x.half(), model_output=mo.half(), backend="cpp"), "needs the compiled extension and float32"),
    ]
    for override, match in cases:
        kw = dict(schedule=SCHED, model_output=mo, x_t=x, step=3, noise=z)
        kw.update(override)
        args = [kw.pop(k) for k in ("schedule", "model_output", "x_t", "step")]
        with pytest.raises(ValueError, match=match):
            p_step(*args, **kw)
    offset_cases = [
        (dict(element_offset=torch.tensor([3.0])), "element_offset must be an int or an int64 tensor"),
        (dict(element_offset=torch.tensor([1, 2])), "one element"),
        (dict(element_offset=torch.tensor([-4])), "must be >= 0"),
        (dict(element_offset=torch.tensor([5]), offset_mod4=2), "agree with offset_mod4=2"),
        (dict(element_offset=torch.tensor([5]), offset_mod4=4), "offset_mod4 must be 0, 1, 2 or 3"),
        (dict(element_offset=torch.tensor([5], device="meta"), offset_mod4=1), "is on meta but the data is on cpu"),
        (dict(element_offset=1.5), "element_offset must be an int >= 0"),
    ]
    for kw, match in offset_cases:
        with pytest.raises(ValueError, match=match):
            p_step(SCHED, mo, x, 3, seed=1, **kw)
        with pytest.raises(ValueError, match=match):
            seeded_randn((3,), 1, **kw)
    from ddpm_fast.ops.noise import offset_arg
    with pytest.raises(ValueError, match="needs offset_mod4=element_offset % 4"):
        offset_arg(torch.tensor([5], device="meta"), None, "meta")
    with pytest.raises(ValueError, match="seed"):
        seeded_randn((3,), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dense"):
        seeded_randn(None, 1, out=torch.empty(4, 6)[:, ::2])


# ---- GPU: the real kernels (skipped without CUDA) ----------------------------------------------------------

# Every prediction x variance pair once, clip and sampler rotating: each compiled specialisation costs ~1 s of
# Triton compilation on the GPU machine, where the whole suite has minutes; the interpreter tests cover all COMBOS.
GPU_COMBOS = [(pred, var, i % 2 == 0, [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.6)][i % 3])
              for i, (pred, var) in enumerate(itertools.product(["eps", "x0", "v"],
                                                                ["fixed_small", "fixed_large", "learned_range"]))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(seed, dtype):
    for pred, var, clip, (sampler, eta) in GPU_COMBOS:
        x, mo, z = _inputs((3, 3, 17, 19), var, dtype, "cuda")
        for step in (0, 7):
            out = p_step(SCHED, mo, x, torch.tensor([step], device="cuda"), prediction=pred, variance=var,
                         clip=clip, sampler=sampler, eta=eta, noise=z)
            assert_rule(out, x, mo, z, step, pred, var, clip, sampler, eta, "cuda")


@pytest.mark.gpu
def test_cuda_noise_is_the_specified_stream_within_the_bound(seed):
    """The compiled kernels' noise (correctly rounded sqrt in Box-Muller; libdevice log/cos/sin) against the
    specification: within NOISE_ERROR_BOUND, like the CPU backends, for p_step's stream and x_T's, with the
    offset as an int and from a device tensor."""
    s, n = seed % 2 ** 63, 1 << 16
    x = torch.zeros(1, 1, n, device="cuda")
    std = SCHED.tables().posterior_std[3].item()
    for offset in (0, 2 ** 34 + 3):
        init = seeded_randn((n,), s, device="cuda", element_offset=offset)
        want = philox_randn_ref(s, 0, STREAM_INIT, np.arange(n) + offset)
        np.testing.assert_allclose(init.cpu().double().numpy(), want, rtol=0, atol=NOISE_ERROR_BOUND)
        offset_t = torch.tensor([offset], device="cuda")
        got = p_step(SCHED, x, x, 3, seed=s, element_offset=offset_t, offset_mod4=offset % 4, clip=False)
        want = philox_randn_ref(s, 3, STREAM_P_STEP, np.arange(n) + offset)
        np.testing.assert_allclose(got.flatten().cpu().double().numpy() / std, want, rtol=0,
                                   atol=NOISE_ERROR_BOUND + 2 ** -23 * 6)


@pytest.mark.gpu
def test_cuda_graph_of_the_whole_loop_replays_with_new_seeds():
    """Capture all 1000 steps (seeded x_T, then a stand-in model + p_step per step) in one CUDA graph: capture
    proves no host sync; replays with the seed written into the static tensor reproduce eager runs and differ
    across seeds."""
    sched = NoiseSchedule.linear(1000)
    sched.tables("cuda")
    seed_t = torch.tensor([1], device="cuda")
    x = torch.empty(4, 3, 8, 8, device="cuda")
    w = torch.randn(3, device="cuda").view(1, 3, 1, 1)

    def loop():
        seeded_randn(None, seed_t, out=x)
        for i in reversed(range(sched.num_steps)):
            p_step(sched, torch.tanh(x * w), x, i, seed=seed_t, out=x)   # each node bakes its own step index

    loop()  # warm-up compiles the kernels
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loop()
    results = {}
    for s in (11, 12, 11):
        seed_t.fill_(s)
        g.replay()
        results.setdefault(s, []).append(x.clone())
        seed_t.fill_(s)
        loop()
        torch.testing.assert_close(results[s][-1], x, rtol=0, atol=0)
    torch.testing.assert_close(results[11][0], results[11][1], rtol=0, atol=0)
    assert (results[11][0] - results[12][0]).abs().max() > 0.1
