"""The few-step solvers' specification (diffusion/solvers.py): step-for-step parity with diffusers'
DPMSolverMultistepScheduler / UniPCMultistepScheduler on integer timestep grids, the order of each step, and the
convergence order against the exact probability-flow ODE of Gaussian data."""
import math

import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion import solvers as S
from ddpm_fast.ops.solver_step import SolverState, solver_step, solver_step_ref

T = 1000
_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_SOLVER_KW = {"dpmpp_2m": {}, "dpmpp_3m": {"solver_order": 3}, "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}
# schedule name -> (diffusers' config, ours); "custom" gives diffusers our sigmoid betas as trained_betas
_SCHEDULES = {
    "linear": (dict(beta_schedule="linear"), lambda: NoiseSchedule.linear(T)),
    "squaredcos_cap_v2": (dict(beta_schedule="squaredcos_cap_v2"), lambda: NoiseSchedule.cosine(T)),
    "scaled_linear": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      lambda: NoiseSchedule.scaled_linear(T)),
    "custom": (dict(trained_betas=NoiseSchedule.sigmoid(T).betas.tolist()), lambda: NoiseSchedule.sigmoid(T)),
}
GRIDS = [(7, "leading"), (10, "linspace"), (20, "trailing")]  # 20 >= 15: 3M's second-to-last step is order 3


def _theirs(sampler, schedule, prediction, spacing, variance=None):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(num_train_timesteps=T, prediction_type=_PRED[prediction], timestep_spacing=spacing,
              **_SCHEDULES[schedule][0])
    if sampler == "unipc":
        return diffusers.UniPCMultistepScheduler(**kw)
    return diffusers.DPMSolverMultistepScheduler(**kw, variance_type=variance, **_SOLVER_KW[sampler])


class _Keep64(torch.Tensor):
    """diffusers' DPM step rounds the sample and the SDE noise to float32 before its update ("upcast"); for the
    float64 comparison these tensors ignore a request for float32, so the check tests the formulas, not that
    rounding."""

    def to(self, *args, **kwargs):
        if args and args[0] is torch.float32:
            args = args[1:]
        if kwargs.get("dtype") is torch.float32:
            del kwargs["dtype"]
        return super().to(*args, **kwargs) if args or kwargs else self


def _model(x, t, w, channels=3):
    """A deterministic model whose output depends on x and on the (original) timestep it is given."""
    out = torch.tanh(x * w.to(x.dtype)) * (1 + float(t) / T)
    return out if channels == 3 else torch.cat([out, torch.tanh(out)], dim=1)


def _in_float64(theirs, base, timesteps):
    """Give diffusers float64 sigmas from our float64 alphas_cumprod (its own are float32)."""
    abar = torch.from_numpy(base.alphas_cumprod)[torch.as_tensor(timesteps)]
    theirs.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])


def _chain(sampler, schedule, prediction, steps, spacing, seed, variance="fixed_small"):
    """Yields (step, ours, theirs) after every step of one float64 chain, both from the same x_T."""
    theirs = _theirs(sampler, schedule, prediction, spacing, "learned_range" if variance == "learned_range" else None)
    theirs.set_timesteps(steps)
    base = _SCHEDULES[schedule][1]()
    ours = base.respace(timesteps=theirs.timesteps)
    assert ours.num_steps == len(theirs.timesteps)
    _in_float64(theirs, base, theirs.timesteps)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, generator=g).view(1, 3, 1, 1)
    x_t = x_o = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 1.5
    state = SolverState(*(torch.zeros_like(x_o) for _ in range(3)))
    channels = 6 if variance == "learned_range" else 3
    for k, t in enumerate(theirs.timesteps):
        i = ours.num_steps - 1 - k
        assert int(ours.timesteps[i]) == int(t)
        z = torch.randn(x_o.shape, generator=g, dtype=torch.float64)
        extra = {"variance_noise": z.as_subclass(_Keep64)} if sampler == "dpmpp_2m_sde" else {}
        x_t = theirs.step(_model(x_t, t, w, channels), t, x_t.as_subclass(_Keep64), **extra).prev_sample
        x_t = x_t.as_subclass(torch.Tensor)
        x_o, state = solver_step_ref(ours, sampler, _model(x_o, ours.timesteps[i], w, channels), x_o, i, state,
                                     prediction=prediction, variance=variance, noise=z)
        state = SolverState(state.h1, state.h2 if state.h2 is not None else torch.zeros_like(x_o),
                            state.last if state.last is not None else torch.zeros_like(x_o))
        yield k, x_o, x_t


@pytest.mark.parametrize("schedule", list(_SCHEDULES))
@pytest.mark.parametrize("sampler", S.SOLVERS)
def test_float64_parity_with_diffusers(seed, sampler, schedule):
    """Every intermediate x equals diffusers' to 1e-10 relative when both use float64 tables: the formulas, the
    order of every step (first, multistep, lower-order final, the jump to sigma 0) and the grids agree."""
    for prediction in ("eps", "x0", "v"):
        for steps, spacing in GRIDS:
            for k, ours, theirs in _chain(sampler, schedule, prediction, steps, spacing, seed):
                torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * (1 + theirs.abs().max().item()),
                                           msg=lambda m: f"{prediction} {steps} {spacing} step {k}: {m}")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"])
def test_float64_parity_learned_variance_uses_the_mean_half(seed, sampler):
    for k, ours, theirs in _chain(sampler, "linear", "eps", 10, "linspace", seed, variance="learned_range"):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * (1 + theirs.abs().max().item()))


@pytest.mark.parametrize("sampler", S.SOLVERS)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_float32_chain_is_as_close_as_diffusers_own(seed, sampler, backend):
    """The fused float32 kernels against the float64 specification, under the project's error rule with stock
    diffusers in float32 (its own float32 tables) as the low-precision twin: |ours - ref64| <= 2 |diffusers32 -
    ref64| + atol, after every step of whole chains."""
    from ddpm_fast.ops import _ext
    if backend == "triton" and not _ext.has_triton() or backend == "cpp" and not _ext.has_cpu_kernels():
        pytest.skip(f"{backend} unavailable")
    for schedule, prediction in (("linear", "eps"), ("squaredcos_cap_v2", "v")):
        theirs = _theirs(sampler, schedule, prediction, "linspace")
        theirs.set_timesteps(12)
        ours = _SCHEDULES[schedule][1]().respace(timesteps=theirs.timesteps)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(3, generator=g).view(1, 3, 1, 1)
        x_t = x_o = torch.randn(2, 3, 5, 7, generator=g)
        x_r = x_o.double()
        st, st_r = SolverState.zeros_like(x_o, sampler), SolverState(*(torch.zeros_like(x_r) for _ in range(3)))
        for k, t in enumerate(theirs.timesteps):
            i = ours.num_steps - 1 - k
            z = torch.randn(x_o.shape, generator=g)
            extra = {"variance_noise": z} if sampler == "dpmpp_2m_sde" else {}
            x_t = theirs.step(_model(x_t, t, w), t, x_t, **extra).prev_sample
            x_o = solver_step(ours, sampler, _model(x_o, t, w), x_o, i, st, prediction=prediction, backend=backend,
                              noise=z if sampler == "dpmpp_2m_sde" else None)
            x_r, new = solver_step_ref(ours, sampler, _model(x_r, t, w), x_r, i, st_r, prediction=prediction,
                                       noise=z.double())
            st_r = SolverState(new.h1, new.h2 if new.h2 is not None else st_r.h2,
                               new.last if new.last is not None else st_r.last)
            err, twin = (x_o.double() - x_r).abs().max().item(), (x_t.double() - x_r).abs().max().item()
            assert err <= 2 * twin + 1e-6 * (1 + x_r.abs().max().item()), f"{schedule} step {k}: {err} vs {twin}"


# ---- the order of each step ----------------------------------------------------------------------------------

def test_step_orders():
    """diffusers' defaults: first order at the first and the last step; 3M drops to order 2 at its second step and,
    below 15 steps, at its second-to-last; UniPC's corrector follows its previous predictor's order."""
    assert [o for o, _ in S.step_orders("dpmpp_2m", 5)] == [1, 2, 2, 2, 1]
    assert [o for o, _ in S.step_orders("dpmpp_3m", 6)] == [1, 2, 3, 3, 2, 1]
    assert [o for o, _ in S.step_orders("dpmpp_3m", 16)] == [1, 2] + [3] * 13 + [1]
    assert S.step_orders("unipc", 5) == [(1, 0), (2, 1), (2, 2), (2, 2), (1, 2)]
    assert S.step_orders("dpmpp_2m", 1) == [(1, 0)] and S.step_orders("unipc", 1) == [(1, 0)]
    with pytest.raises(ValueError, match="sampler must be one of"):
        S.step_orders("ddim", 3)


def test_last_step_lands_on_the_data_prediction():
    """Every solver's last step goes to sigma 0: x_0 = the data prediction there, with no noise."""
    sched = NoiseSchedule.linear(100).respace(6)
    for sampler in S.SOLVERS:
        rows = S.solver_rows(sched.alphas_cumprod, sampler)
        assert rows["a"][0] == 0 and rows["b0"][0] == 1 and rows["s"][0] == 0
        assert rows["b1"][0] == 0 and rows["b2"][0] == 0
        if sampler == "dpmpp_2m_sde":
            assert (rows["s"][1:] > 0).all()


# ---- convergence order against the exact flow ----------------------------------------------------------------
# Data x0 ~ N(mu, s^2) per pixel: the exact data prediction is x0*(x) = mu + alpha s^2 (x - alpha mu) / std^2 and
# the probability-flow ODE from noise level a to b is x_b = m_b + (std_b / std_a)(x_a - m_a), m = alpha mu,
# std^2 = alpha^2 s^2 + sigma^2. Grids uniform in (unrounded) lambda from -5 to 4.6 (sigma_min ~ 0.01), no
# lower-order final step, no jump to sigma 0: the solvers' formulas alone.

def _point(lam):
    return S.Point(math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam))))


def _flow_error(sampler, n, mu, s, x_T, first_order=False):
    pts = [_point(-5.0 + k * 9.6 / n) for k in range(n + 1)]

    def x0(x, p):
        return mu + p.alpha * s ** 2 * (x - p.alpha * mu) / (p.alpha ** 2 * s ** 2 + p.sigma ** 2)

    def std(p):
        return (p.alpha ** 2 * s ** 2 + p.sigma ** 2).sqrt()
    order = 1 if first_order else S.ORDER[sampler]
    pred = [min(order, k + 1) for k in range(n)]  # first-order start, then the solver's order to the end
    orders = [(p, pred[k - 1] if k and sampler == "unipc" else 0) for k, p in enumerate(pred)]
    x, h1, h2, last = x_T, None, None, None
    for k in range(n):
        m = x0(x, pts[k])
        x_next, xc = S.solver_update_ref(sampler, pts, k, x, m, h1, h2, last, None, orders)
        last, h2, h1, x = xc, h1, m, x_next
    exact = pts[-1].alpha * mu + std(pts[-1]) / std(pts[0]) * (x_T - pts[0].alpha * mu)
    return (x - exact).abs().max().item()


def test_convergence_order_against_the_exact_flow(seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(64, generator=g, dtype=torch.float64) * 0.8 - 0.4
    s = torch.rand(64, generator=g, dtype=torch.float64) * 0.3 + 0.3
    x_T = torch.randn(64, generator=g, dtype=torch.float64)
    counts = (20, 40, 80, 160)
    err = {name: [_flow_error(name, n, mu, s, x_T) for n in counts] for name in ("dpmpp_2m", "dpmpp_3m", "unipc")}
    err["ddim"] = [_flow_error("dpmpp_2m", n, mu, s, x_T, first_order=True) for n in counts]

    def order(e):
        return math.log(e[0] / e[-1]) / math.log(counts[-1] / counts[0])
    assert order(err["dpmpp_2m"]) >= 1.8, err
    assert order(err["unipc"]) >= 1.8, err  # measured ~2.9: the corrector adds an order
    assert 0.8 <= order(err["ddim"]) <= 1.2, err
    # DPM-Solver++(3M) as published (and in diffusers): its D2 term carries half the Taylor coefficient of
    # third order, so it converges at order 2 (measured 2.0 between 80 and 160 steps, even with exact history);
    # it must still beat 2M at every step count.
    assert order(err["dpmpp_3m"]) >= 1.8, err
    assert all(e3 < e2 for e3, e2 in zip(err["dpmpp_3m"], err["dpmpp_2m"])), err
