"""The benchmark baseline (ddpm_fast.bench.baseline) samples the same distribution as ddpm_fast: a fair comparison.

The Gaussian oracle: for data x_0 ~ N(mu, s^2) per pixel the optimal eps predictor is
eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t), and with it every ancestral
step is affine in x_t plus Gaussian noise, so the exact mean and variance of the sampler's output follow in
closed form (float64 NumPy below, from the paper's formulas). Each sampler must hit those moments within
sampling error; the moments themselves are within the stated discretisation bias of (mu, s).
"""
import numpy as np
import pytest
import torch
from torch import nn

import ddpm_fast
from ddpm_fast import NoiseSchedule
from ddpm_fast.bench.baseline import PlainDiffusion, plain_guided_sample, plain_sample
from ddpm_fast.ops.p_step import p_step_ref

T = 1000
SHAPE = (1, 3, 3)
N = 2000
Z_MAX = 4.5  # 18 z-scores per check: a false alarm about once in 8000 runs


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class GaussianOracle(nn.Module):
    """The optimal eps predictor for data N(mu, s^2) per pixel; called with ORIGINAL timesteps (N,)."""

    def __init__(self, betas, mu, s):
        super().__init__()
        self.register_buffer("abar", torch.from_numpy(np.cumprod(1 - betas)).float())
        self.register_buffer("mu", mu.float())
        self.register_buffer("s2", s.float() ** 2)

    def forward(self, x, t):
        ab = self.abar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s2 + 1 - ab)


def exact_moments(betas, steps, mu, s, variance):
    """Mean and std of x_0 from the ancestral sampler with the oracle: x_{i-1} = a x_i + b + sigma z, exactly."""
    abar_full, n_train = np.cumprod(1 - betas), len(betas)
    ts = np.round(np.linspace(0, n_train - 1, steps)).astype(np.int64) if steps < n_train else np.arange(n_train)
    ab = abar_full[ts]
    abp = np.concatenate([[1.0], ab[:-1]])
    beta = 1 - ab / abp
    sigma2 = beta * (1 - abp) / (1 - ab) if variance == "fixed_small" else beta
    c1, c2 = beta * np.sqrt(abp) / (1 - ab), (1 - abp) * np.sqrt(1 - beta) / (1 - ab)
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i in reversed(range(steps)):
        k = np.sqrt(1 - ab[i]) / (ab[i] * s ** 2 + 1 - ab[i])
        slope = c1[i] * (1 - np.sqrt(1 - ab[i]) * k) / np.sqrt(ab[i]) + c2[i]  # x0_hat and x_t both affine in x_t
        m = slope * m + c1[i] * np.sqrt(1 - ab[i]) * k * mu
        v = slope ** 2 * v + (sigma2[i] if i > 0 else 0.0)
    return m, np.sqrt(v)


def moment_z_scores(samples, mean, std):
    """|z| of each pixel's sample mean and sample std against the exact (mean, std)."""
    x = samples.double().numpy()
    n = x.shape[0]
    z_mean = (x.mean(0) - mean) / (std / np.sqrt(n))
    z_std = (x.std(0, ddof=1) - std) / (std / np.sqrt(2 * (n - 1)))
    return np.abs(np.concatenate([z_mean.ravel(), z_std.ravel()]))


@pytest.fixture
def problem(seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5          # [-0.5, 0.5)
    s = 0.1 + 0.4 * torch.rand(SHAPE, generator=g, dtype=torch.float64)     # [0.1, 0.5)
    betas = NoiseSchedule.linear(T).betas
    return betas, mu, s, GaussianOracle(betas, mu, s)


def _baseline(oracle, betas, steps, variance, seed, scheduler=None):
    diff = PlainDiffusion(betas, steps, variance=variance, clip=False)
    g = torch.Generator().manual_seed(seed)
    return plain_sample(oracle, N, steps, diffusion=diff, shape=SHAPE, generator=g, scheduler=scheduler)


def _ddpm_fast(oracle, steps, variance, seed):
    """ddpm_fast.sample with the same oracle (a foreign module: shape and schedule given)."""
    return ddpm_fast.sample(oracle, N, steps, shape=SHAPE, schedule=NoiseSchedule.linear(T), variance=variance,
                            clip=False, seed=seed, progress=False)


@pytest.mark.parametrize("sampler, variance, steps", [
    ("baseline", "fixed_small", T), ("baseline", "fixed_small", 25), ("baseline", "fixed_large", 25),
    ("ddpm_fast.sample", "fixed_large", T), ("ddpm_fast.sample", "fixed_small", 25),
    ("ddpm_fast.sample", "fixed_large", 25)])
def test_oracle_moments(problem, seed, sampler, variance, steps):
    betas, mu, s, oracle = problem
    mean, std = exact_moments(betas, steps, mu.numpy(), s.numpy(), variance)
    if steps == T:  # the discretisation bias of a 1000-step chain is small: the moments are the data's
        assert np.abs(mean - mu.numpy()).max() < 1e-3 and np.abs(std / s.numpy() - 1).max() < 0.06
    with torch.inference_mode():
        x = _baseline(oracle, betas, steps, variance, seed) if sampler == "baseline" else \
            _ddpm_fast(oracle, steps, variance, seed)
    z = moment_z_scores(x, mean, std)
    assert z.max() < Z_MAX, f"{sampler}: worst z = {z.max():.1f} (means then stds: {np.round(z, 1)})"


def test_oracle_moments_diffusers_scheduler(problem, seed):
    """The baseline with diffusers' DDPMScheduler.step in place of the hand-written step, on a 100-step chain
    sampled in full (diffusers respaces by its own rule, so shorter chains have other moments; its step costs
    ~10 ms here under load, hence not T = 1000)."""
    diffusers = pytest.importorskip("diffusers")
    _, mu, s, _ = problem
    T_short = 100
    sched = diffusers.DDPMScheduler(num_train_timesteps=T_short, beta_start=1e-3, beta_end=0.2,
                                    variance_type="fixed_small", clip_sample=False)
    betas = NoiseSchedule.linear(T_short, beta_start=1e-3, beta_end=0.2).betas
    mean, std = exact_moments(betas, T_short, mu.numpy(), s.numpy(), "fixed_small")
    x = _baseline(GaussianOracle(betas, mu, s), betas, T_short, "fixed_small", seed, scheduler=sched)
    z = moment_z_scores(x, mean, std)
    assert z.max() < Z_MAX, f"worst z = {z.max():.1f}"


def test_oracle_check_detects_a_wrong_variance(problem, seed):
    """The check has power: fixed_large samples fail against fixed_small's moments at 25 steps.
    (Over 60 seeded problems the largest |z| ranged from 41 upward, so 10 * Z_MAX = 45 failed 1 run in 20; a
    margin of 4x the threshold is still far outside what a right sampler produces.)"""
    betas, mu, s, oracle = problem
    mean, std = exact_moments(betas, 25, mu.numpy(), s.numpy(), "fixed_small")
    z = moment_z_scores(_baseline(oracle, betas, 25, "fixed_large", seed), mean, std)
    assert z.max() > 4 * Z_MAX


@pytest.mark.parametrize("steps", [1, 7, 25, 1000])
def test_respaced_timesteps_match_ddpm_fast(steps):
    betas = NoiseSchedule.linear(T).betas
    assert PlainDiffusion(betas, steps).timesteps == NoiseSchedule.linear(T).respace(steps).timesteps.tolist()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_step_matches_the_reference(seed, prediction, variance, clip):
    """One baseline step with injected noise equals ddpm_fast's specification (diffusion.ddpm_step)."""
    steps, n, C = 50, 3, 2
    sched = NoiseSchedule.cosine(T).respace(steps)
    diff = PlainDiffusion(NoiseSchedule.cosine(T).betas, steps, prediction=prediction, variance=variance,
                          clip=clip)
    x = torch.randn(n, C, 5, 7)
    out = torch.randn(n, C, 5, 7)
    if variance == "learned_range":  # the variance channels are an interpolation value in [-1, 1]
        out = torch.cat([out, torch.rand(n, C, 5, 7) * 2 - 1], dim=1)
    noise = torch.randn_like(x)
    kw = dict(prediction=prediction, variance=variance, clip=clip, noise=noise)
    for step in (0, 1, int(torch.randint(2, steps, ())), steps - 1):
        got = diff.p_sample(out, x, torch.full((n,), step), noise)
        ref64 = p_step_ref(sched, out.double(), x.double(), step, **{**kw, "noise": noise.double()})
        ref32 = p_step_ref(sched, out, x, step, **kw)
        assert (got.double() - ref64).abs().max() <= 2 * (ref32.double() - ref64).abs().max() + 1e-6, step


@pytest.mark.parametrize("batched", [True, False])
def test_plain_guided_loop_has_the_exact_guided_law(seed, batched):
    """plain_guided_sample (the guidance benchmark's baseline) draws the exact law of guided DDPM on the
    class-conditional Gaussian oracle (tests/oracles.py), per class, one call of 2n or two calls per step."""
    from oracles import GuidedGaussianOracle, assert_moments, exact_moments, gaussian_x0, guided_x0
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand((3, 2, 3, 3), generator=g, dtype=torch.float64) * 0.8 - 0.4
    s = torch.rand((3, 2, 3, 3), generator=g, dtype=torch.float64) * 0.3 + 0.3
    base = NoiseSchedule.linear(T)
    model = GuidedGaussianOracle(base, mu, s)
    labels = torch.tensor([0, 1]).repeat(N)
    diff = PlainDiffusion(base.betas, 25, variance="fixed_small", clip=False)
    x = plain_guided_sample(model, 2 * N, 25, labels, 3.0, null_label=2, batched=batched, diffusion=diff,
                            shape=(2, 3, 3), generator=torch.Generator().manual_seed(seed))
    assert model.batches == ([2 * 2 * N] if batched else [2 * N, 2 * N]) * 25
    uncond = gaussian_x0(mu[2].numpy(), s[2].numpy())
    for k in (0, 1):
        law = guided_x0(gaussian_x0(mu[k].numpy(), s[k].numpy()), uncond, 3.0)
        m, v = exact_moments(base.respace(25), mu[k], s[k], x0=law)
        assert_moments(x[labels == k], m, v, f"class {k}", z_max=Z_MAX)
