"""The few-step solvers' fused step: every backend vs the specification for every solver, prediction, dtype and
step kind, its history updates, its noise, layouts, contracts, and the Triton kernels' sm_90 compile."""
import itertools

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion import solvers
from ddpm_fast.ops import _ext
from ddpm_fast.ops.noise import STREAM_P_STEP, philox_randn_ref
from ddpm_fast.ops.p_step import p_step
from ddpm_fast.ops.solver_step import SolverState, solver_step, solver_step_ref

from solver_states import clone_state as _clone, random_state as _state

needs_triton = pytest.mark.skipif(not _ext.has_triton(), reason="needs triton")
needs_ext = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the compiled extension")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "torch", pytest.param("triton", marks=needs_triton)]
ATOL = {torch.float32: 2e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}
SCHED = NoiseSchedule.linear(100).respace(10)
STEPS = (9, 8, 5, 1, 0)  # first (order 1, no corrector), second, middle, second-to-last, last (to sigma 0)


def _inputs(shape, variance, dtype, gen, device="cpu"):
    N, C = shape[:2]
    x = (torch.randn(shape, generator=gen) * 1.5).to(device, dtype)
    mo = torch.randn((N, 2 * C if variance == "learned_range" else C, *shape[2:]), generator=gen).to(device, dtype)
    return x, mo, torch.randn(shape, generator=gen).to(device, dtype)


def _truncate_bf16(t):
    # The Triton interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest): its naive twin.
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


def assert_rule(out, st, x, mo, z, st0, step, sampler, pred, var, what):
    """x after the step and every history buffer: |out - ref64| <= 2 |ref(dtype) - ref64| + atol."""
    kw = dict(prediction=pred, variance=var)
    ref64, new64 = solver_step_ref(SCHED, sampler, mo.double(), x.double(), step, _clone(st0, torch.float64),
                                   noise=z.double(), **kw)
    naive, _ = solver_step_ref(SCHED, sampler, mo, x, step, st0, noise=z, **kw)
    if what == "triton" and x.dtype == torch.bfloat16 and _ext.triton_interpret():
        naive = _truncate_bf16(solver_step_ref(SCHED, sampler, mo.float(), x.float(), step, st0, noise=z.float(),
                                               **kw)[0])
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (naive.double() - ref64).abs().max().item() + ATOL[x.dtype]
    assert err <= bound, f"{what} {sampler} {kw} step={step}: error {err:.3g} > {bound:.3g}"
    assert out.dtype == x.dtype and out.shape == x.shape
    for name in ("h1", "h2", "last"):  # the history is float32: only float32 rounding of float64 values
        got, want = getattr(st, name), getattr(new64, name)
        if got is not None:
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6 + 2 * ATOL[x.dtype],
                                       msg=lambda m: f"{what} {sampler} state.{name} step {step}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_solver_matches_the_specification(seed, backend, dtype):
    if backend == "cpp" and dtype != torch.float32:
        pytest.skip("the C++ kernel is fp32; other dtypes take the torch path")
    gen = torch.Generator().manual_seed(seed)
    for sampler, pred, var in itertools.product(solvers.SOLVERS, ("eps", "x0", "v"),
                                                ("fixed_small", "learned_range")):
        for step in (STEPS if dtype == torch.float32 else (8, 0)):
            x, mo, z = _inputs((2, 3, 5, 7), var, dtype, gen)
            st0 = _state(sampler, x, gen)
            st = _clone(st0)
            kw = dict(noise=z) if sampler in solvers.STOCHASTIC else {}
            out = solver_step(SCHED, sampler, mo, x, step, st, prediction=pred, variance=var, backend=backend, **kw)
            assert_rule(out, st, x, mo, z, st0, step, sampler, pred, var, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tensors_take_every_code_path(seed, backend):
    """Several OpenMP tiles and 8-lane tails (C++), many 1024-blocks (Triton), for every solver."""
    gen = torch.Generator().manual_seed(seed)
    block = 1024 if backend == "triton" else None
    for sampler in solvers.SOLVERS:
        x, mo, z = _inputs((3, 5, 37, 41), "fixed_small", torch.float32, gen)
        st0 = _state(sampler, x, gen)
        st = _clone(st0)
        if backend == "triton":
            from ddpm_fast.ops.triton.solver_step import solver_step_triton
            out = torch.empty_like(x)
            solver_step_triton(x, mo, SCHED.tables().packed, SCHED.solver_tables(sampler).packed, None, 4, z, None,
                               0, None, "v", sampler, st.h1, st.h2, st.last, out, stream=STREAM_P_STEP,
                               block=block)
        else:
            out = solver_step(SCHED, sampler, mo, x, 4, st, prediction="v", backend=backend,
                              noise=z if sampler in solvers.STOCHASTIC else None)
        assert_rule(out, st, x, mo, z, st0, 4, sampler, "v", "fixed_small", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_step_tensor_and_in_place(seed, backend):
    """channels_last x and history, a strided (sliced) model output, a step in a tensor, and out= aliasing x."""
    gen = torch.Generator().manual_seed(seed)
    for sampler in solvers.SOLVERS:
        x, mo, z = _inputs((3, 4, 5, 6), "fixed_small", torch.float32, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        big = torch.randn(3, 6, 5, 9, generator=gen)
        big[:, 1:-1, :, 2:8] = mo
        st0 = _state(sampler, x, gen)
        kw = dict(prediction="eps", backend=backend, noise=z if sampler in solvers.STOCHASTIC else None)
        want_st = _clone(st0)
        want = solver_step(SCHED, sampler, mo, x.contiguous(), 6, _contiguous(want_st), **kw)
        st = _clone(st0)
        got = solver_step(SCHED, sampler, big[:, 1:-1, :, 2:8], x, torch.tensor(6), st, **kw)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        st_inplace, buf = _clone(st0), x.clone()
        assert solver_step(SCHED, sampler, mo, buf, 6, st_inplace, out=buf, **kw) is buf
        torch.testing.assert_close(buf, want, rtol=1e-6, atol=1e-6)
        for a, b in zip((st.h1, st.h2, st.last), (st_inplace.h1, st_inplace.h2, st_inplace.last)):
            assert a is None or torch.equal(a, b)


def _contiguous(st):
    return SolverState(*(None if t is None else t.contiguous() for t in (st.h1, st.h2, st.last)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_noise_is_the_p_step_stream(seed, backend):
    """dpmpp_2m_sde's seeded noise at step index i is Philox STREAM_P_STEP at step word i (the numbers DDPM's
    p_step draws at that step), element by element, at offsets that split Philox groups and past 2^32 counters;
    the last step draws none."""
    s = seed % 2 ** 63
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((2, 3, 5, 5), "fixed_small", torch.float32, gen)
    coef = SCHED.solver_tables("dpmpp_2m_sde").s
    for offset in (0, 75, 2 ** 34 + 3):
        st = _state("dpmpp_2m_sde", x, gen)
        base = solver_step(SCHED, "dpmpp_2m_sde", mo, x, 3, _clone(st), noise=torch.zeros_like(x), backend=backend)
        got = solver_step(SCHED, "dpmpp_2m_sde", mo, x, 3, _clone(st), seed=s, element_offset=offset,
                          backend=backend)
        z = ((got - base) / coef[3]).flatten().double().numpy()
        np.testing.assert_allclose(z, philox_randn_ref(s, 3, STREAM_P_STEP, np.arange(x.numel()) + offset),
                                   atol=3e-4)
        ddpm = p_step(SCHED, mo, x, 3, seed=s, element_offset=offset, backend=backend)
        ddpm_base = p_step(SCHED, mo, x, 3, noise=torch.zeros_like(x), backend=backend)
        torch.testing.assert_close(((ddpm - ddpm_base) / SCHED.tables().posterior_std[3]).flatten(),
                                   torch.from_numpy(z).float(), rtol=0, atol=5e-4)
    last = solver_step(SCHED, "dpmpp_2m_sde", mo, x, 0, _clone(st), seed=s, backend=backend)
    torch.testing.assert_close(last, solver_step(SCHED, "dpmpp_2m", mo, x, 0, _clone(st), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_equal_the_full_batch_bitwise(seed, backend):
    """A batch in chunks (element_offset = first sample * C*H*W; 75 elements per sample, not 4- or 8-aligned)
    gives the unchunked result bit for bit, history included."""
    gen = torch.Generator().manual_seed(seed)
    for sampler in solvers.SOLVERS:
        x, mo, _ = _inputs((5, 3, 5, 5), "fixed_small", torch.float32, gen)
        st0 = _state(sampler, x, gen)
        full_st = _clone(st0)
        full = solver_step(SCHED, sampler, mo, x, torch.tensor([7]), full_st, seed=seed, backend=backend)
        for lo, hi in ((0, 1), (1, 4), (4, 5)):
            part_st = SolverState(*(None if t is None else t[lo:hi].clone() for t in (st0.h1, st0.h2, st0.last)))
            part = solver_step(SCHED, sampler, mo[lo:hi], x[lo:hi], torch.tensor([7]), part_st, seed=seed,
                               element_offset=lo * 75, backend=backend)
            assert torch.equal(part, full[lo:hi]), sampler
            for a, b in zip((part_st.h1, part_st.h2, part_st.last), (full_st.h1, full_st.h2, full_st.last)):
                assert a is None or torch.equal(a, b[lo:hi])


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_offset_from_a_tensor(seed, backend):
    """element_offset as an int64 tensor (what a captured graph reads) draws what the int draws; its residue mod 4
    must agree when given."""
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((2, 3, 5, 5), "fixed_small", torch.float32, gen)
    st0 = _state("dpmpp_2m_sde", x, gen)
    want = solver_step(SCHED, "dpmpp_2m_sde", mo, x, 6, _clone(st0), seed=seed, element_offset=83, backend=backend)
    for mod4 in (None, 3):
        got = solver_step(SCHED, "dpmpp_2m_sde", mo, x, 6, _clone(st0), seed=seed, backend=backend,
                          element_offset=torch.tensor([83]), offset_mod4=mod4)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="agree with offset_mod4"):
        solver_step(SCHED, "dpmpp_2m_sde", mo, x, 6, _clone(st0), seed=seed, element_offset=torch.tensor([83]),
                    offset_mod4=1, backend=backend)


@needs_ext
def test_cpu_result_is_independent_of_thread_count(seed):
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((4, 3, 32, 32), "fixed_small", torch.float32, gen)  # several 2048-element tiles
    st0 = _state("unipc", x, gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for sampler in ("unipc", "dpmpp_2m_sde"):
                outs.append(solver_step(SCHED, sampler, mo, x, 5, _clone(st0) if sampler == "unipc" else
                                        SolverState(st0.h1.clone()), seed=seed, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_propagate(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    x, mo, _ = _inputs((2, 3, 7, 9), "fixed_small", torch.float32, gen)
    mo[1, 2, 4, 5] = float("nan")
    st = _state("unipc", x, gen)
    out = solver_step(SCHED, "unipc", mo, x, 5, st, backend=backend)
    assert out[1, 2, 4, 5].isnan() and st.h1[1, 2, 4, 5].isnan()
    assert torch.isfinite(out).sum() == out.numel() - 1


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x, mo, z = _inputs((2, 3, 4, 4), "learned_range", torch.float32, gen)
    table = SCHED.tables().packed
    for sampler, step, noise, seed_t in (("unipc", torch.tensor([4]), None, None),
                                         ("dpmpp_2m_sde", None, z, None), ("dpmpp_2m_sde", None, None,
                                                                           torch.tensor([7]))):
        st = _state(sampler, x, gen)
        torch.library.opcheck(torch.ops.ddpm_fast.solver_step_.default,
                              (x, mo, table, SCHED.solver_tables(sampler).packed, step, 4, noise, seed_t, 1,
                               torch.tensor([5]), "v", sampler, st.h1, st.h2, st.last, torch.empty_like(x), None))


def test_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    x, mo, z = _inputs((2, 3, 4, 4), "fixed_small", torch.float32, gen)
    st = SolverState.zeros_like(x, "unipc")
    cases = [
        (dict(sampler="ddim"), "sampler must be one of"),
        (dict(schedule=SCHED.tables()), "schedule must be a NoiseSchedule"),
        (dict(model_output=torch.randn(2, 6, 4, 4)), r"model_output must have shape \(2, 3, 4, 4\)"),
        (dict(x=x.double()), "x must be float32, float16 or bfloat16"),
        (dict(x=torch.randn(2, 3, 4, 8)[..., ::2]), "x must be dense"),
        (dict(step=10), r"step index 10 out of range \[0, 10\)"),
        (dict(step=torch.tensor([1.0])), "int64"),
        (dict(state=SolverState.zeros_like(x, "dpmpp_2m")), r"needs state.h2"),
        (dict(state="history"), "state must be a SolverState"),
        (dict(state=SolverState(torch.zeros(2, 3, 4, 4, dtype=torch.float16), st.h2, st.last)),
         "state.h1 must be float32"),
        (dict(noise=z), "draws no noise"),
        (dict(sampler="dpmpp_2m_sde", state=SolverState.zeros_like(x, "dpmpp_2m")), "pass noise=, generator="),
        (dict(sampler="dpmpp_2m_sde", state=SolverState.zeros_like(x, "dpmpp_2m"), noise=z, seed=3),
         "one noise source"),
        (dict(prediction="score"), "prediction"),
        (dict(element_offset=-1), "element_offset"),
        (dict(out=torch.empty(2, 3, 4, 4, dtype=torch.float16)), "out must match"),
        (dict(backend="cuda"), "backend"),
    ]
    for override, match in cases:
        kw = dict(schedule=SCHED, sampler="unipc", model_output=mo, x=x, step=3, state=st)
        kw.update(override)
        args = [kw.pop(k) for k in ("schedule", "sampler", "model_output", "x", "step", "state")]
        with pytest.raises(ValueError, match=match):
            solver_step(*args, **kw)


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ddpm_fast.ops.triton import p_step as tp, solver_step as ts
target = GPUTarget("cuda", 90, 32)
i32, f32, ptr = "i32", "fp32", "*fp32"
common = {"n_elements": i32, "C": i32, "S": i32, "mo_sn": i32, "mo_sc": i32, "mo_ss": i32, "mo_un": i32,
          "num_steps": i32, "lead": i32}
ptrs = {"step_ptr": "*i64", "seed_ptr": "*i64", "offset_ptr": "*i64", "w_ptr": ptr, "step_arg": i32,
        "offset_arg": "i64"}
solver = {"x_ptr": "*bf16", "mo_ptr": "*bf16", "noise_ptr": ptr, "out_ptr": "*bf16", "h1_ptr": ptr, "h2_ptr": ptr,
          "last_ptr": ptr, "tab_ptr": ptr, "coef_ptr": ptr, **ptrs, **common}
flags = ["PRED", "HIST", "CORRECTOR", "NOISE", "STREAM", "STEP_FROM_PTR", "OFFSET_FROM_PTR", "CHANNELS_LAST",
         "MO_LIKE_X", "GUIDED", "BLOCK"]
for hist, corr, noise, from_ptr, guided in ((1, False, 2, True, True), (2, True, 0, False, False),
                                            (2, False, 1, True, True), (1, False, 2, False, False)):
    const = dict(PRED=2, HIST=hist, CORRECTOR=corr, NOISE=noise, STREAM=0, STEP_FROM_PTR=from_ptr,
                 OFFSET_FROM_PTR=from_ptr, CHANNELS_LAST=False, MO_LIKE_X=not corr, GUIDED=guided, BLOCK=1024)
    src = ASTSource(ts._solver_step_kernel, {**solver, **{k: "constexpr" for k in flags}}, const)
    assert "ptx" in triton.compile(src, target=target).asm
pstep = {"x_ptr": "*fp16", "mo_ptr": "*fp16", "noise_ptr": "*fp16", "out_ptr": "*fp16", "tab_ptr": ptr, **ptrs,
         "n_elements": i32, "C": i32, "S": i32, "mo_sn": i32, "mo_sc": i32, "mo_ss": i32, "var_off": i32,
         "mo_un": i32, "num_steps": i32, "lead": i32, "eta": f32}
pflags = ["PRED", "VAR", "CLIP", "DDIM", "NOISE", "STREAM", "STEP_FROM_PTR", "OFFSET_FROM_PTR", "CHANNELS_LAST",
          "MO_LIKE_X", "GUIDED", "BLOCK"]
for var, ddim, guided in ((2, False, True), (0, True, False)):
    const = dict(PRED=0, VAR=var, CLIP=True, DDIM=ddim, NOISE=2, STREAM=0, STEP_FROM_PTR=True, OFFSET_FROM_PTR=True,
                 CHANNELS_LAST=True, MO_LIKE_X=False, GUIDED=guided, BLOCK=1024)
    src = ASTSource(tp._p_step_kernel, {**pstep, **{k: "constexpr" for k in pflags}}, const)
    assert "ptx" in triton.compile(src, target=target).asm
print("compiled")
"""


@pytest.mark.slow
@needs_triton
def test_triton_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: build the solver kernel (and p_step's, which now
    shares its data-prediction helper, guided and not) for sm_90 without a GPU, in a subprocess (this one
    interprets Triton)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# ---- GPU: the real kernels (skipped without CUDA) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_the_specification(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    for sampler, pred in itertools.product(solvers.SOLVERS, ("eps", "v")):
        for step in STEPS:
            x, mo, z = (t.cuda() for t in _inputs((3, 3, 17, 19), "fixed_small", dtype, gen))
            st0 = _state(sampler, x, gen)
            st = _clone(st0)
            out = solver_step(SCHED, sampler, mo, x, torch.tensor([step], device="cuda"), st, prediction=pred,
                              noise=z if sampler in solvers.STOCHASTIC else None)
            cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
            assert_rule(out.cpu(), SolverState(cpu(st.h1), cpu(st.h2), cpu(st.last)), x.cpu(), mo.cpu(), z.cpu(),
                        SolverState(cpu(st0.h1), cpu(st0.h2), cpu(st0.last)), step, sampler, pred, "fixed_small",
                        "triton")
