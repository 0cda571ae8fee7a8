"""ddpm_fast.sample with the few-step solvers: exact output laws (Gaussian oracle), closeness to the converged
solver on a Gaussian mixture, diffusers' own full-loop expectations, x_T=, graphs, chunks, seeds, defaults and
refusals."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import ddpm_fast
from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion.config import DEFAULT_SPACING, DEFAULT_STEPS
from ddpm_fast.diffusion.solvers import SOLVERS
from ddpm_fast.sampling import last_run_info

from oracles import GaussianOracle, MixtureOracle, assert_moments, exact_solver_moments

SHAPE = (2, 4, 4)
Z_MAX = 5.0
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---- exact output laws ---------------------------------------------------------------------------------------
# Gaussian data: every solver's output is affine in x_T (and the SDE's step noises), so its exact law follows from
# running the solver's formulas on the coefficients in float64 (oracles.exact_solver_moments). The samples must
# match THAT law; the chain's bias against the data law N(mu, s^2) is what the solver's discretization leaves.

CASES = [  # (sampler, steps, spacing, prediction, variance, schedule)
    ("dpmpp_2m", 10, "logsnr", "eps", "fixed_small", "linear"),
    ("dpmpp_3m", 20, "trailing", "v", "fixed_small", "cosine"),
    ("dpmpp_3m", 5, "linspace", "eps", "fixed_large", "linear"),
    ("dpmpp_2m_sde", 15, "logsnr", "x0", "fixed_small", "linear"),
    ("unipc", 8, "leading", "eps", "learned_range", "scaled_linear"),
    ("unipc", 25, "logsnr", "v", "fixed_small", "sigmoid"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_samples_follow_the_exact_law_of_the_solver(seed, case):
    sampler, steps, spacing, prediction, variance, schedule = case
    base = getattr(NoiseSchedule, schedule)(1000)
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 0.8 - 0.4
    s = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 0.3 + 0.3
    model = GaussianOracle(base, mu, s, prediction, var_value=0.3 if variance == "learned_range" else None)
    n = 8192
    x = ddpm_fast.sample(model, n, steps, shape=SHAPE, schedule=base, prediction=prediction, variance=variance,
                         sampler=sampler, spacing=spacing, clip=False, seed=seed, progress=False, batch_size=n)
    chain = base.respace(steps, spacing)
    assert model.calls == chain.num_steps  # one chunk, one model call per step
    m, v = exact_solver_moments(chain, mu, s, sampler)
    assert_moments(x, m, v, str(case))


def test_exact_law_recursion_is_the_solver():
    """The recursion is no tautology: at 500 steps every solver's exact law is the data's N(mu, s^2) to within
    1e-3, and at 5 steps 2M's differs from 3M's and from the data (the test above would see a wrong solver)."""
    base = NoiseSchedule.linear(1000)
    mu, s = torch.full((4,), 0.3, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    for sampler in SOLVERS:
        m, v = exact_solver_moments(base.respace(500, "logsnr"), mu, s, sampler)
        assert np.abs(m - 0.3).max() < 1e-3 and np.abs(np.sqrt(v) - 0.5).max() < 1e-3, sampler
    m2, v2 = exact_solver_moments(base.respace(5, "logsnr"), mu, s, "dpmpp_2m")
    m3, v3 = exact_solver_moments(base.respace(5, "logsnr"), mu, s, "dpmpp_3m")
    assert np.abs(v2 - v3).max() > 1e-3 and np.abs(np.sqrt(v2) - 0.5).max() > 1e-2


# ---- a Gaussian mixture: few steps against the converged solver -----------------------------------------------
# Stated allowances: ODE solvers at 20 logsnr-spaced steps move each sample by at most 0.015 on average from
# where 500 steps take the same x_T (measured: 2M 0.008, UniPC 0.0035, 3M 0.0026; DDIM at 20 steps 0.037);
# dpmpp_2m_sde at 50 steps has the 500-step law's mean, variance and mode weights within 0.01 + 5 standard errors.

def _mixture(base):
    shape = (1, 2, 2)
    return MixtureOracle(base, torch.tensor([-0.6, -0.4, -0.5, -0.7]).view(shape),
                         torch.tensor([0.1, 0.15, 0.2, 0.12]).view(shape), torch.tensor([0.5, 0.6, 0.3, 0.4]).view(shape),
                         torch.tensor([0.15, 0.1, 0.12, 0.2]).view(shape)), shape


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_ode_solvers_at_20_steps_land_near_500_steps_on_a_mixture(seed, sampler):
    base = NoiseSchedule.linear(1000)
    model, shape = _mixture(base)
    kw = dict(shape=shape, schedule=base, sampler=sampler, clip=False, seed=seed, progress=False, spacing="logsnr")
    few, many = ddpm_fast.sample(model, 2000, 20, **kw), ddpm_fast.sample(model, 2000, 500, **kw)
    gap = (few - many).abs().mean().item()
    assert gap <= 0.015, f"{sampler}: 20 steps land {gap:.4f} from 500 steps on average"


@pytest.mark.slow
def test_sde_solver_at_50_steps_has_the_500_step_law_on_a_mixture(seed):
    base = NoiseSchedule.linear(1000)
    model, shape = _mixture(base)
    kw = dict(shape=shape, schedule=base, sampler="dpmpp_2m_sde", clip=False, progress=False, spacing="logsnr")
    a = ddpm_fast.sample(model, 4000, 50, seed=seed, **kw).double().flatten(1)
    b = ddpm_fast.sample(model, 4000, 500, seed=seed + 1, **kw).double().flatten(1)  # independent draws
    n = a.shape[0]
    mid = ((model.mu1 + model.mu2) / 2).flatten()
    for name, fa, fb in (("mean", a, b), ("variance", (a - a.mean(0)) ** 2, (b - b.mean(0)) ** 2),
                         ("mode weight", (a > mid).double(), (b > mid).double())):
        diff = (fa.mean(0) - fb.mean(0)).abs()
        se = ((fa.var(0) + fb.var(0)) / n).sqrt()
        assert torch.all(diff <= 0.01 + Z_MAX * se), f"{name}: {diff.tolist()} vs se {se.tolist()}"


# ---- diffusers' own test suite, ported --------------------------------------------------------------------------
# Expected values from huggingface/diffusers tests/schedulers/test_scheduler_dpm_multi.py
# (DPMSolverMultistepSchedulerTest: test_full_loop_no_noise 0.3301, test_full_loop_with_v_prediction 0.2251,
# test_full_loop_with_noise sum 318.4111 / mean 0.4146), config: linear betas 1e-4..0.02, T=1000, 10 steps,
# solver_order=2, dpmsolver++, midpoint, lower_order_final=False, final_sigmas_type="sigma_min". Their chain ends at
# the noise level of timestep 0; ours always end at sigma 0: with timestep 0 appended to their grid our chain visits
# the same levels with the same orders, then takes one more step, to the data prediction at t = 0, which for their
# dummy model (eps = x t / (t + 1) = 0 at t = 0) is x / sqrt(abar_0): so ours * sqrt(abar_0) is their sample.
# Their UniPCMultistepScheduler suite has only final_sigmas_type="sigma_min" loops with a first-order last
# predictor, which no chain ending at sigma 0 reproduces; UniPC is held to diffusers step for step instead
# (tests/diffusion/test_solvers.py).

class _DiffusersDummy(nn.Module):
    """diffusers' SchedulerCommonTest.dummy_model: sample * t / (t + 1)."""

    def forward(self, x, t):
        t = t.view(-1, 1, 1, 1).to(x.dtype)
        return x * t / (t + 1)


def _dummy_sample_deter():
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2).contiguous()


def _dummy_noise_deter():
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2).contiguous()


def _their_grid(T=1000, steps=10):
    """DPMSolverMultistepScheduler's timesteps for 10 steps, timestep_spacing="linspace": 999, 899, ..., 100."""
    return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()


@pytest.mark.parametrize("prediction,expected", [("eps", 0.3301), ("v", 0.2251)])
def test_diffusers_dpm_full_loop_no_noise(prediction, expected):
    base = NoiseSchedule.linear(1000)
    chain = base.respace(timesteps=_their_grid() + [0])
    x = ddpm_fast.sample(_DiffusersDummy(), 4, shape=(3, 8, 8), schedule=chain, prediction=prediction,
                         sampler="dpmpp_2m", clip=False, x_T=_dummy_sample_deter(), progress=False)
    theirs = x * math.sqrt(base.alphas_cumprod[0])
    assert abs(theirs.abs().mean().item() - expected) < 1e-3


def test_diffusers_dpm_full_loop_with_noise_from_a_partly_noised_start():
    """Their test_full_loop_with_noise: add_noise to timestep 499 (t_start = 5 of 10), then the last 5 steps:
    ours starts from that x_T with the truncated grid (SDEdit-style)."""
    base = NoiseSchedule.linear(1000)
    grid = _their_grid()[5:]
    ab = base.alphas_cumprod[grid[0]]
    x_T = (math.sqrt(ab) * _dummy_sample_deter().double() + math.sqrt(1 - ab) * _dummy_noise_deter()).float()
    x = ddpm_fast.sample(_DiffusersDummy(), 4, shape=(3, 8, 8), schedule=base.respace(timesteps=grid + [0]),
                         sampler="dpmpp_2m", clip=False, x_T=x_T, progress=False)
    theirs = x * math.sqrt(base.alphas_cumprod[0])
    assert abs(theirs.abs().sum().item() - 318.4111) < 1e-2
    assert abs(theirs.abs().mean().item() - 0.4146) < 1e-3


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc"])
def test_generator_reproduces_a_diffusers_run(seed, sampler):
    """generator= draws x_T and the SDE noise with torch.randn as diffusers does, so a diffusers loop over the same
    grid (its scheduler's timesteps, given to respace) with an equally seeded generator gives the same images."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UniPCMultistepScheduler() if sampler == "unipc" else \
        diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    theirs.set_timesteps(12)
    model = _DiffusersDummy()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((3, 3, 8, 8), generator=g)
    for t in theirs.timesteps:
        extra = {"generator": g} if sampler != "unipc" else {}
        x = theirs.step(model(x, t.expand(3)), t, x, **extra).prev_sample
    chain = NoiseSchedule.linear(1000).respace(timesteps=theirs.timesteps)
    ours = ddpm_fast.sample(model, 3, shape=(3, 8, 8), schedule=chain, sampler=sampler, clip=False, progress=False,
                            generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)  # float32 tables on both sides: measured ~1e-6


# ---- x_T, seeds, chunks, graphs -------------------------------------------------------------------------------

def _oracle(T=200, shape=(3, 3, 3)):
    base = NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(1)
    return GaussianOracle(base, torch.rand(shape, generator=g) - 0.5, torch.rand(shape, generator=g) * 0.3 + 0.3), \
        base, shape


@pytest.mark.parametrize("sampler", SOLVERS)
def test_seeds_chunks_and_x_T(seed, sampler):
    """Bitwise: same seed, same images; chunks (13 * 27 elements: offsets inside Philox groups) equal one batch;
    x_T= is sliced by the chunks; the ODE solvers are deterministic given x_T, the SDE solver is not."""
    model, base, shape = _oracle()
    kw = dict(shape=shape, schedule=base, sampler=sampler, clip=False, progress=False, steps=12)
    whole = ddpm_fast.sample(model, 40, seed=seed, **kw)
    assert torch.equal(whole, ddpm_fast.sample(model, 40, seed=seed, **kw))
    assert torch.equal(whole, ddpm_fast.sample(model, 40, seed=seed, batch_size=13, **kw))
    assert last_run_info()["chunks"] == 4
    assert (ddpm_fast.sample(model, 40, seed=seed + 1, **kw) - whole).abs().mean() > 0.05
    x_T = torch.randn(40, *shape, generator=torch.Generator().manual_seed(seed))
    given = ddpm_fast.sample(model, 40, seed=seed, x_T=x_T, **kw)
    assert torch.equal(given, ddpm_fast.sample(model, 40, seed=seed, x_T=x_T, batch_size=13, **kw))
    other_seed = ddpm_fast.sample(model, 40, seed=seed + 1, x_T=x_T, **kw)
    assert torch.equal(given, other_seed) == (sampler != "dpmpp_2m_sde")
    assert not torch.equal(given, whole)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_x_T_for_ddpm_and_ddim_is_what_the_model_first_sees(seed, sampler):
    seen = []

    class Spy(nn.Module):
        def forward(self, x, t):
            seen.append(x.clone())
            return torch.tanh(x)
    x_T = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(seed)).double()  # any float dtype
    kw = dict(shape=(2, 4, 4), schedule=NoiseSchedule.linear(50), sampler=sampler, seed=seed, progress=False)
    ddpm_fast.sample(Spy(), 5, 6, x_T=x_T, batch_size=2, **kw)
    assert torch.equal(torch.cat(seen[0::6]), x_T.float())  # the first call of each of the 3 chunks


@pytest.mark.parametrize("graph", ["whole", "step"])
def test_solver_graph_replays_equal_eager(seed, fake_graphs, graph):
    from ddpm_fast.sampling import graphs
    backend = fake_graphs()
    model, base, shape = _oracle(T=60)
    kw = dict(shape=shape, schedule=base, clip=False, progress=False, graph=graph, steps=9)
    for sampler in SOLVERS:
        eager = ddpm_fast.sample(model, 6, seed=seed, cuda_graph=False, sampler=sampler, **kw)
        first = ddpm_fast.sample(model, 6, seed=seed, sampler=sampler, **kw)
        assert last_run_info()["modes"] == [f"graph-{graph}"] and torch.equal(first, eager), sampler
        again = ddpm_fast.sample(model, 6, seed=seed, sampler=sampler, **kw)  # history re-zeroed per chain
        assert torch.equal(again, eager) and last_run_info()["cache_hits"] == 1
        x_T = torch.randn(6, *shape, generator=torch.Generator().manual_seed(seed))
        given = ddpm_fast.sample(model, 6, seed=seed, x_T=x_T, sampler=sampler, **kw)
        assert torch.equal(given, ddpm_fast.sample(model, 6, seed=seed, x_T=x_T, sampler=sampler, cuda_graph=False,
                                                   **kw))
        x_T2 = torch.randn(6, *shape, generator=torch.Generator().manual_seed(seed + 1))
        assert not torch.equal(given, ddpm_fast.sample(model, 6, seed=seed, x_T=x_T2, sampler=sampler, **kw))
        assert last_run_info()["cache_hits"] == 1  # a new x_T replays the same graph
    assert len(backend.captured) == 2 * len(SOLVERS) and set(backend.captured) == {graph}
    assert len(graphs._CACHE) <= graphs.MAX_PLANS


@pytest.mark.parametrize("graph", ["whole", "step"])
def test_one_solver_graph_serves_every_chunk_with_its_noise_and_x_T_rows(seed, fake_graphs, graph):
    """The element offset is read from device memory: one captured graph replays every chunk, the SDE solver's
    noise of chunk k is chunk k's, and with x_T= each replay starts from that chunk's rows."""
    backend = fake_graphs()
    model, base, shape = _oracle(T=40, shape=(3, 4, 6))
    kw = dict(shape=shape, schedule=base, clip=False, progress=False, seed=seed, steps=7, sampler="dpmpp_2m_sde")
    x_T = torch.randn(12, *shape, generator=torch.Generator().manual_seed(seed))
    for extra in ({}, {"x_T": x_T}):
        eager = ddpm_fast.sample(model, 12, cuda_graph=False, **kw, **extra)
        chunked = ddpm_fast.sample(model, 12, batch_size=3, graph=graph, **kw, **extra)
        info = last_run_info()
        assert info["modes"] == [f"graph-{graph}"] * 4 and info["cache_hits"] == 3
        assert torch.equal(chunked, eager) and not torch.equal(chunked[:3], chunked[3:6])
    assert backend.captured == [graph, graph]  # drawn x_T and given x_T are two plans


def test_history_is_reset_for_every_chain(seed, fake_graphs):
    """The static history of a cached plan is zeroed when a chain starts (inside the graph too): a NaN left by a
    failed run never reaches the next one (0 * NaN is NaN, so zero coefficients alone would not do)."""
    fake_graphs()

    class Poisoned(nn.Module):
        poison = True

        def forward(self, x, t):
            return x * float("nan") if self.poison else torch.tanh(x)
    model = Poisoned()
    kw = dict(shape=(2, 4, 4), schedule=NoiseSchedule.linear(50), sampler="unipc", steps=6, seed=seed,
              progress=False)  # graphs (the stand-in) keep the plan's static buffers across calls
    with pytest.raises(FloatingPointError):
        ddpm_fast.sample(model, 3, **kw)
    model.poison = False
    assert torch.isfinite(ddpm_fast.sample(model, 3, **kw)).all()


@pytest.fixture
def fake_graphs(monkeypatch):
    """test_sample.py's CPU stand-in for CUDA graphs (capture keeps the body, replay re-runs it)."""
    import importlib.util
    import os
    from ddpm_fast.sampling import graphs
    spec = importlib.util.spec_from_file_location("_stand_in", os.path.join(os.path.dirname(__file__),
                                                                            "test_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def install(**kw):
        backend = module.EagerReplayGraphs(**kw)
        monkeypatch.setattr(graphs, "BACKEND", backend)
        graphs.clear_graph_cache()
        return backend
    yield install
    graphs.clear_graph_cache()


# ---- defaults and refusals --------------------------------------------------------------------------------------

def test_each_sampler_uses_its_documented_defaults(seed):
    model, base, shape = _oracle(T=1000, shape=(1, 2, 2))
    for sampler in ("ddpm", "ddim") + SOLVERS:
        ddpm_fast.sample(model, 2, shape=shape, schedule=base, sampler=sampler, seed=seed, progress=False)
        want = base if DEFAULT_STEPS[sampler] is None else base.respace(DEFAULT_STEPS[sampler],
                                                                          DEFAULT_SPACING[sampler])
        assert last_run_info()["steps"] == want.num_steps, sampler
    given = base.respace(timesteps=[10, 300, 700, 999])
    model.calls = 0
    ddpm_fast.sample(model, 2, shape=shape, schedule=given, sampler="unipc", seed=seed, progress=False)
    assert model.calls == 4  # a respaced schedule is used as given


BAD = [
    (dict(sampler="dpmpp_4m"), "sampler must be one of"),
    (dict(sampler="dpmpp_2m_sde", eta=0.5), "eta applies to sampler='ddim' only .* no eta"),
    (dict(sampler="dpmpp_3m", steps=2), "order 3: it needs at least 3 steps, got 2"),
    (dict(sampler="unipc", steps=1), "order 2: it needs at least 2 steps, got 1"),
    (dict(sampler="dpmpp_2m", spacing="uniform"), "spacing must be one of"),
    (dict(x_T=torch.zeros(3, 2, 4, 4)), r"x_T must have shape \(n, C, H, W\) = \(2, 2, 4, 4\)"),
    (dict(x_T=torch.zeros(2, 2, 4, 4, dtype=torch.int64)), "x_T must be a floating-point tensor"),
    (dict(x_T=torch.full((2, 2, 4, 4), float("nan"))), "x_T must be finite"),
    (dict(x_T=[0.0]), "x_T must be a tensor"),
]


@pytest.mark.parametrize("override,match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_fail_before_the_model_runs(override, match):
    model, base, _ = _oracle(T=50, shape=(2, 4, 4))
    kw = dict(n=2, steps=5, shape=(2, 4, 4), schedule=base, seed=1, progress=False)
    kw.update(override)
    with pytest.raises(ValueError, match=match):
        ddpm_fast.sample(model, **kw)
    assert model.calls == 0


# ---- GPU (skipped without CUDA) --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("graph", ["whole", "step"])
def test_cuda_solver_graphs_equal_eager_chunks_and_the_cpu(seed, graph):
    from ddpm_fast.sampling import clear_graph_cache
    clear_graph_cache()
    model, base, shape = _oracle(T=100, shape=(3, 5, 7))
    kw = dict(shape=shape, schedule=base, steps=15, clip=False, progress=False)
    for sampler in SOLVERS:
        gpu = model.cuda()
        eager = ddpm_fast.sample(gpu, 9, seed=seed, cuda_graph=False, sampler=sampler, **kw)
        graphed = ddpm_fast.sample(gpu, 9, seed=seed, graph=graph, sampler=sampler, **kw)
        assert last_run_info()["modes"] == [f"graph-{graph}"] and torch.equal(graphed, eager), sampler
        chunked = ddpm_fast.sample(gpu, 9, seed=seed, batch_size=4, sampler=sampler, **kw)
        assert torch.equal(chunked, eager), sampler
        cpu = ddpm_fast.sample(model.cpu(), 9, seed=seed, sampler=sampler, **kw)
        torch.testing.assert_close(eager.cpu(), cpu, rtol=0, atol=1e-4)
