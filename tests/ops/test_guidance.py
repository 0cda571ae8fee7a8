"""Classifier-free guidance inside the fused steps: ``p_step`` and ``solver_step`` with ``guidance_scale=w`` read a
2N-sample model output (conditional outputs first) and combine u + w (c - u) before the data prediction. Every
backend (C++, Triton interpreter, torch) against the specification (``diffusion.guided_model_output`` then the
step's reference) under the error rule, for every sampler, prediction, variance and dtype; w = 1 and w = 0 exactly
the conditional / unconditional step; the variance of a learned-range output from the conditional half; w read
from its tensor at every call; chunks, layouts, block sizes and threads; bad input."""
import itertools

import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion import guided_model_output, solvers
from ddpm_fast.ops import _ext
from ddpm_fast.ops.noise import STREAM_P_STEP
from ddpm_fast.ops.p_step import p_step, p_step_ref
from ddpm_fast.ops.solver_step import SolverState, solver_step, solver_step_ref

from solver_states import clone_state as _clone, random_state as _state, state_tensors as _states

needs_triton = pytest.mark.triton_cpu  # the Triton interpreter on CPU tensors (conftest.py)
needs_ext = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the compiled extension")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "torch", pytest.param("triton", marks=needs_triton)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}
SCHED = NoiseSchedule.linear(100).respace(10)
P_STEP_SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.6)]


def _inputs(shape, variance, dtype, gen, device="cpu"):
    """x (N, ...), a guided model output (2N, C or 2C, ...) with distinct conditional and unconditional halves (a
    learned variance in [-1, 1]), and noise; random, never zero."""
    N, C = shape[:2]
    x = torch.randn(shape, generator=gen) * 1.5
    mo = torch.randn((2 * N, 2 * C if variance == "learned_range" else C, *shape[2:]), generator=gen)
    if variance == "learned_range":
        mo[:, C:] = torch.rand((2 * N, C, *shape[2:]), generator=gen) * 2 - 1
    z = torch.randn(shape, generator=gen)
    return x.to(device, dtype), mo.to(device, dtype), z.to(device, dtype)


def _scale(gen):
    """A guidance scale in [1.5, 6): the range users pick (this w is the paper's w + 1)."""
    return 1.5 + 4.5 * torch.rand((), generator=gen).item()


def _truncate_bf16(t):
    # The Triton interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest): its naive twin.
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


def _rule(out, ref64, naive, dtype, what):
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (naive.double() - ref64).abs().max().item() + ATOL[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"
    assert out.dtype == dtype


# ---- the specification ----------------------------------------------------------------------------------------

def test_the_specification_combines_the_halves(seed):
    """guided_model_output: u + w (c - u) on the prediction half, the conditional variance half, c at w = 1 and u
    at w = 0 exactly, in the compute dtype; the wrong sample count is refused."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((3, 2, 4, 5), "learned_range", torch.float32, gen)
    c, u = mo[:3], mo[3:]
    got = guided_model_output(mo, x, "learned_range", 2.5)
    torch.testing.assert_close(got[:, :2], u[:, :2] + 2.5 * (c[:, :2] - u[:, :2]), rtol=0, atol=0)
    assert torch.equal(got[:, 2:], c[:, 2:])
    assert torch.equal(guided_model_output(mo, x, "learned_range", 1.0), c)
    assert torch.equal(guided_model_output(mo, x, "learned_range", torch.tensor([0.0])),
                       torch.cat([u[:, :2], c[:, 2:]], 1))
    assert guided_model_output(mo.half(), x.half(), "learned_range", 3.0).dtype == torch.float32
    assert torch.equal(guided_model_output(mo[:, :2], x, "fixed_small", 1.0), c[:, :2])
    with pytest.raises(ValueError, match=r"guided model_output must have shape \(6, 4, 4, 5\)"):
        guided_model_output(mo[:5], x, "learned_range", 2.0)


# ---- every backend against the specification --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_guided_p_step_matches_the_specification(seed, backend, dtype):
    if backend == "cpp" and dtype != torch.float32:
        pytest.skip("the C++ kernel is fp32; other dtypes take the torch path")
    gen = torch.Generator().manual_seed(seed)
    combos = itertools.product(["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"], [False, True],
                               P_STEP_SAMPLERS)
    for pred, var, clip, (sampler, eta) in combos:
        for step in ((0, 6) if dtype == torch.float32 else (6,)):
            x, mo, z = _inputs((2, 3, 5, 7), var, dtype, gen)
            w = _scale(gen)
            kw = dict(prediction=pred, variance=var, clip=clip, sampler=sampler, eta=eta)
            out = p_step(SCHED, mo, x, step, noise=z, backend=backend, guidance_scale=torch.tensor([w]), **kw)
            ref64 = p_step_ref(SCHED, mo.double(), x.double(), step, noise=z.double(), guidance_scale=w, **kw)
            naive = p_step_ref(SCHED, mo, x, step, noise=z, guidance_scale=w, **kw)
            if backend == "triton" and dtype == torch.bfloat16 and _ext.triton_interpret():
                naive = _truncate_bf16(p_step_ref(SCHED, mo.float(), x.float(), step, noise=z.float(),
                                                  guidance_scale=w, **kw))
            _rule(out, ref64, naive, dtype, f"{backend} {kw} w={w:.3f} step={step}")


def _solver_rule(out, st, x, mo, z, st0, step, sampler, pred, var, w, backend):
    kw = dict(prediction=pred, variance=var, guidance_scale=w)
    ref64, new64 = solver_step_ref(SCHED, sampler, mo.double(), x.double(), step, _clone(st0, torch.float64),
                                   noise=z.double(), **kw)
    naive, _ = solver_step_ref(SCHED, sampler, mo, x, step, st0, noise=z, **kw)
    if backend == "triton" and x.dtype == torch.bfloat16 and _ext.triton_interpret():
        naive = _truncate_bf16(solver_step_ref(SCHED, sampler, mo.float(), x.float(), step, st0, noise=z.float(),
                                               **kw)[0])
    what = f"{backend} {sampler} {pred} {var} w={w:.3f} step={step}"
    _rule(out, ref64, naive, x.dtype, what)
    for name in ("h1", "h2", "last"):  # the history is float32: only float32 rounding of float64 values
        got, want = getattr(st, name), getattr(new64, name)
        if got is not None:
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 + 2 * ATOL[x.dtype],
                                       msg=lambda m: f"{what} state.{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_guided_solver_step_matches_the_specification(seed, backend, dtype):
    if backend == "cpp" and dtype != torch.float32:
        pytest.skip("the C++ kernel is fp32; other dtypes take the torch path")
    gen = torch.Generator().manual_seed(seed)
    for sampler, pred, var in itertools.product(solvers.SOLVERS, ("eps", "x0", "v"),
                                                ("fixed_small", "learned_range")):
        for step in ((9, 8, 5, 0) if dtype == torch.float32 else (8, 0)):
            x, mo, z = _inputs((2, 3, 5, 7), var, dtype, gen)
            st0 = _state(sampler, x, gen)
            st, w = _clone(st0), _scale(gen)
            kw = dict(noise=z) if sampler in solvers.STOCHASTIC else {}
            out = solver_step(SCHED, sampler, mo, x, step, st, prediction=pred, variance=var, backend=backend,
                              guidance_scale=torch.tensor([w]), **kw)
            _solver_rule(out, st, x, mo, z, st0, step, sampler, pred, var, w, backend)


# ---- w = 1 and w = 0 ----------------------------------------------------------------------------------------------

def _halves(mo, n, channels, variance):
    """(the conditional output, the unconditional prediction with the conditional variance half)."""
    cond = mo[:n]
    uncond = torch.cat([mo[n:, :channels], mo[:n, channels:]], 1) if variance == "learned_range" else mo[n:]
    return cond.contiguous(), uncond.contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_w_one_is_the_conditional_step_and_w_zero_the_unconditional_one_exactly(seed, backend):
    """Bitwise: with w = 1 the guided step is the unguided step on the conditional outputs, with w = 0 on the
    unconditional ones (the kernels skip the combine); for every sampler, seeded noise included."""
    gen = torch.Generator().manual_seed(seed)
    s = seed % 2 ** 62
    for var, (sampler, eta) in itertools.product(("fixed_large", "learned_range"), P_STEP_SAMPLERS):
        x, mo, _ = _inputs((3, 2, 6, 5), var, torch.float32, gen)
        cond, uncond = _halves(mo, 3, 2, var)
        kw = dict(prediction="v", variance=var, sampler=sampler, eta=eta, seed=s, backend=backend)
        for w, half in ((1.0, cond), (0.0, uncond)):
            got = p_step(SCHED, mo, x, 5, guidance_scale=torch.tensor([w]), **kw)
            assert torch.equal(got, p_step(SCHED, half, x, 5, **kw)), (var, sampler, w)
    for sampler in solvers.SOLVERS:
        x, mo, _ = _inputs((3, 2, 6, 5), "fixed_small", torch.float32, gen)
        cond, uncond = _halves(mo, 3, 2, "fixed_small")
        st0 = _state(sampler, x, gen)
        for w, half in ((1.0, cond), (0.0, uncond)):
            st_g, st_u = _clone(st0), _clone(st0)
            got = solver_step(SCHED, sampler, mo, x, 6, st_g, seed=s, backend=backend, guidance_scale=w)
            want = solver_step(SCHED, sampler, half, x, 6, st_u, seed=s, backend=backend)
            assert torch.equal(got, want), (sampler, w)
            assert all(a is None or torch.equal(a, b) for a, b in zip(_states(st_g), _states(st_u)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_variance_comes_from_the_conditional_half(seed, backend):
    """A learned-range output's variance half is read from the conditional outputs only: changing the
    unconditional variance channels changes nothing, changing the conditional ones changes the step."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, z = _inputs((2, 3, 5, 6), "learned_range", torch.float32, gen)
    kw = dict(variance="learned_range", noise=z, backend=backend, guidance_scale=3.0)
    base = p_step(SCHED, mo, x, 6, **kw)
    other_u = mo.clone()
    other_u[2:, 3:] = -other_u[2:, 3:]
    assert torch.equal(p_step(SCHED, other_u, x, 6, **kw), base)
    other_c = mo.clone()
    other_c[:2, 3:] = -other_c[:2, 3:]
    assert (p_step(SCHED, other_c, x, 6, **kw) - base).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_w_is_read_from_its_tensor_at_every_call(seed, backend):
    """One guidance tensor, rewritten between calls (what a captured graph replays with): each call uses the
    value it holds then, exactly as that value passed as a float."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((2, 3, 5, 5), "fixed_small", torch.float32, gen)
    w_t = torch.zeros(1)
    st0 = _state("dpmpp_2m", x, gen)
    results = []
    for w in (2.0, 4.5, 2.0):
        w_t.fill_(w)
        got = p_step(SCHED, mo, x, 4, seed=seed, backend=backend, guidance_scale=w_t)
        assert torch.equal(got, p_step(SCHED, mo, x, 4, seed=seed, backend=backend, guidance_scale=w))
        got_s = solver_step(SCHED, "dpmpp_2m", mo, x, 4, _clone(st0), backend=backend, guidance_scale=w_t)
        assert torch.equal(got_s, solver_step(SCHED, "dpmpp_2m", mo, x, 4, _clone(st0), backend=backend,
                                              guidance_scale=w))
        results.append(got)
    assert torch.equal(results[0], results[2]) and not torch.equal(results[0], results[1])


# ---- chunks, layouts, code paths ----------------------------------------------------------------------------------

def _chunk(mo, n, lo, hi):
    """The guided model output of samples lo..hi-1 of an n-sample batch: their conditional then unconditional rows."""
    return torch.cat([mo[lo:hi], mo[n + lo:n + hi]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_of_a_guided_batch_equal_the_full_batch_bitwise(seed, backend):
    """The unconditional half sits N samples after the conditional one for any N: chunks (75 elements per sample,
    offsets that split Philox groups and vector lanes) give the full batch's result bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((5, 3, 5, 5), "learned_range", torch.float32, gen)
    kw = dict(variance="learned_range", seed=seed, backend=backend, guidance_scale=2.5)
    full = p_step(SCHED, mo, x, torch.tensor([8]), **kw)
    x_s, mo_s, _ = _inputs((5, 3, 5, 5), "fixed_small", torch.float32, gen)
    st0 = _state("dpmpp_2m_sde", x_s, gen)
    full_s = solver_step(SCHED, "dpmpp_2m_sde", mo_s, x_s, 7, _clone(st0), seed=seed, backend=backend,
                         guidance_scale=2.5)
    for lo, hi in ((0, 1), (1, 4), (4, 5)):
        part = p_step(SCHED, _chunk(mo, 5, lo, hi), x[lo:hi], torch.tensor([8]), element_offset=lo * 75, **kw)
        assert torch.equal(part, full[lo:hi])
        st = SolverState(st0.h1[lo:hi].clone())
        part_s = solver_step(SCHED, "dpmpp_2m_sde", _chunk(mo_s, 5, lo, hi), x_s[lo:hi], 7, st, seed=seed,
                             element_offset=lo * 75, backend=backend, guidance_scale=2.5)
        assert torch.equal(part_s, full_s[lo:hi])


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_layouts_and_in_place(seed, backend):
    """channels_last x, a strided (sliced) guided model output, a step in a tensor, out= aliasing x."""
    gen = torch.Generator().manual_seed(seed)
    for var in ("learned_range", "fixed_small"):
        x, mo, z = _inputs((3, 4, 5, 6), var, torch.float32, gen)
        big = torch.randn(6, mo.shape[1] + 2, 5, 9, generator=gen)
        big[:, 1:-1, :, 2:8] = mo
        kw = dict(variance=var, noise=z, backend=backend, guidance_scale=3.0)
        want = p_step(SCHED, mo, x, 7, **kw)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        got = p_step(SCHED, big[:, 1:-1, :, 2:8], x_cl, torch.tensor(7), **kw)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        buf = x_cl.clone()
        assert p_step(SCHED, mo.contiguous(memory_format=torch.channels_last), buf, 7, out=buf, **kw) is buf
        torch.testing.assert_close(buf, want, rtol=1e-6, atol=1e-6)
    st0 = _state("unipc", x, gen)
    want = solver_step(SCHED, "unipc", mo, x, 6, _clone(st0), backend=backend, guidance_scale=3.0)
    st = SolverState(*(t.contiguous(memory_format=torch.channels_last) for t in _states(st0)))
    got = solver_step(SCHED, "unipc", big[:, 1:-1, :, 2:8], x_cl, 6, st, backend=backend, guidance_scale=3.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_guided_tensors_take_every_code_path(seed, backend):
    """Several 2048-element tiles with 8-lane tails (C++) and many 1024-element blocks (Triton, launched at the GPU
    block size) for p_step and every solver."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, z = _inputs((3, 5, 37, 41), "fixed_small", torch.float32, gen)
    w = _scale(gen)
    tables = SCHED.tables()
    if backend == "triton":
        from ddpm_fast.ops.triton.p_step import p_step_triton
        out = torch.empty_like(x)
        p_step_triton(x, mo, tables.packed, None, 4, z, None, 0, None, "v", "fixed_small", True, False, 0.0, out,
                      torch.tensor([w]), STREAM_P_STEP, 1024)
    else:
        out = p_step(SCHED, mo, x, 4, prediction="v", noise=z, backend=backend, guidance_scale=w)
    kw = dict(prediction="v", guidance_scale=w)
    _rule(out, p_step_ref(SCHED, mo.double(), x.double(), 4, noise=z.double(), **kw),
          p_step_ref(SCHED, mo, x, 4, noise=z, **kw), torch.float32, f"{backend} p_step")
    for sampler in solvers.SOLVERS:
        st0 = _state(sampler, x, gen)
        st = _clone(st0)
        if backend == "triton":
            from ddpm_fast.ops.triton.solver_step import solver_step_triton
            out = torch.empty_like(x)
            solver_step_triton(x, mo, tables.packed, SCHED.solver_tables(sampler).packed, None, 4, z, None, 0, None,
                               "eps", sampler, st.h1, st.h2, st.last, out, torch.tensor([w]), STREAM_P_STEP, 1024)
        else:
            out = solver_step(SCHED, sampler, mo, x, 4, st, backend=backend, guidance_scale=w,
                              noise=z if sampler in solvers.STOCHASTIC else None)
        _solver_rule(out, st, x, mo, z, st0, 4, sampler, "eps", "fixed_small", w, backend)


@needs_ext
@pytest.mark.skipif(not getattr(_ext.load(), "with_openmp", False), reason="the extension was built without OpenMP")
def test_guided_cpu_kernels_on_two_threads(seed):
    """71355 elements (2 threads need >= 32768): the 2-thread guided steps are bitwise the 1-thread ones."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((3, 5, 67, 71), "learned_range", torch.float32, gen)
    st0 = _state("unipc", x, gen)
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append((p_step(SCHED, mo, x, 5, variance="learned_range", seed=seed, element_offset=3,
                                backend="cpp", guidance_scale=2.0),
                         solver_step(SCHED, "unipc", mo, x, 5, _clone(st0), variance="learned_range", backend="cpp",
                                     guidance_scale=2.0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_guided_outputs_propagate(seed, backend):
    """NaN in either half reaches the result (w = 2), so sampling's one finiteness check sees it."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((2, 3, 7, 9), "fixed_small", torch.float32, gen)
    mo[0, 1, 2, 3], mo[3, 2, 4, 5] = float("nan"), float("nan")  # conditional of sample 0, unconditional of 1
    out = p_step(SCHED, mo, x, 5, clip=True, seed=seed, backend=backend, guidance_scale=2.0)
    assert out[0, 1, 2, 3].isnan() and out[1, 2, 4, 5].isnan()
    assert torch.isfinite(out).sum() == out.numel() - 2
    out = solver_step(SCHED, "dpmpp_2m", mo, x, 5, _state("dpmpp_2m", x, gen), backend=backend, guidance_scale=2.0)
    assert out[0, 1, 2, 3].isnan() and out[1, 2, 4, 5].isnan()


# ---- contracts ---------------------------------------------------------------------------------------------------

def test_bad_guidance_inputs():
    gen = torch.Generator().manual_seed(0)
    x, mo, z = _inputs((2, 3, 4, 4), "fixed_small", torch.float32, gen)
    cases = [
        (dict(model_output=mo[:2]), r"needs a model_output of 2N = 4 samples"),
        (dict(model_output=mo[:, :, :, :2]), r"model_output must have shape \(2, 3, 4, 4\)"),
        (dict(guidance_scale=torch.tensor([2.0], dtype=torch.float64)), "float32 tensor with one element"),
        (dict(guidance_scale=torch.tensor([2.0, 3.0])), "float32 tensor with one element"),
        (dict(guidance_scale=torch.tensor([2.0], device="meta")), "guidance_scale is on meta"),
        (dict(guidance_scale=True), "guidance_scale must be a float"),
        (dict(guidance_scale="2"), "guidance_scale must be a float"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be finite"),
        (dict(guidance_scale=torch.tensor([float("nan")])), "guidance_scale must be finite"),
    ]
    for override, match in cases:
        kw = dict(model_output=mo, guidance_scale=2.0)
        kw.update(override)
        with pytest.raises(ValueError, match=match):
            p_step(SCHED, kw.pop("model_output"), x, 3, noise=z, **kw)
        st = SolverState.zeros_like(x, "unipc")
        with pytest.raises(ValueError, match=match):
            solver_step(SCHED, "unipc", override.get("model_output", mo), x, 3, st,
                        guidance_scale=override.get("guidance_scale", 2.0))
    with pytest.raises(ValueError, match=r"model_output must have shape \(2, 3, 4, 4\)"):
        p_step(SCHED, mo, x, 3, noise=z)  # a 2N-sample output without guidance_scale


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x, mo, z = _inputs((2, 3, 4, 4), "learned_range", torch.float32, gen)
    table = SCHED.tables().packed
    torch.library.opcheck(torch.ops.ddpm_fast.p_step_.default,
                          (x, mo, table, torch.tensor([4]), 4, None, torch.tensor([7]), 1, torch.tensor([5]), "v",
                           "learned_range", True, False, 0.0, torch.empty_like(x), torch.tensor([2.5])))
    st = _state("dpmpp_3m", x, gen)
    torch.library.opcheck(torch.ops.ddpm_fast.solver_step_.default,
                          (x, mo, table, SCHED.solver_tables("dpmpp_3m").packed, None, 4, None, None, 0, None, "eps",
                           "dpmpp_3m", st.h1, st.h2, st.last, torch.empty_like(x), torch.tensor([3.0])))


# ---- GPU: the real kernels (skipped without CUDA) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_guided_steps_match_the_specification(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    for var, (sampler, eta) in (("learned_range", ("ddpm", 0.0)), ("fixed_small", ("ddim", 0.6))):
        x, mo, z = _inputs((3, 3, 17, 19), var, dtype, gen, "cuda")
        kw = dict(prediction="eps", variance=var, clip=True, sampler=sampler, eta=eta, guidance_scale=2.5)
        out = p_step(SCHED, mo, x, torch.tensor([7], device="cuda"), noise=z,
                     **{**kw, "guidance_scale": torch.tensor([2.5], device="cuda")})
        x, mo, z = x.cpu(), mo.cpu(), z.cpu()
        _rule(out.cpu(), p_step_ref(SCHED, mo.double(), x.double(), 7, noise=z.double(), **kw),
              p_step_ref(SCHED, mo, x, 7, noise=z, **kw), dtype, f"cuda p_step {var} {sampler}")
    for sampler in solvers.SOLVERS:
        x, mo, z = _inputs((3, 3, 17, 19), "fixed_small", dtype, gen)
        st0 = _state(sampler, x, gen)
        st = SolverState(*(None if t is None else t.cuda() for t in _states(_clone(st0))))
        out = solver_step(SCHED, sampler, mo.cuda(), x.cuda(), torch.tensor([5], device="cuda"), st,
                          noise=z.cuda() if sampler in solvers.STOCHASTIC else None,
                          guidance_scale=torch.tensor([2.5], device="cuda"))
        st_cpu = SolverState(*(None if t is None else t.cpu() for t in _states(st)))
        _solver_rule(out.cpu(), st_cpu, x, mo, z, st0, 5, sampler, "eps", "fixed_small", 2.5, "cuda")
