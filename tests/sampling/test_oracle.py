"""The Gaussian oracle: for data x0 ~ N(mu, s^2) per pixel the optimal predictor is known in closed form, e.g.
    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),
and with it (clip=False) every sampler here is a linear-Gaussian chain: the distribution of its output is EXACTLY
Gaussian with a per-pixel mean and variance that a float64 recursion over the schedule computes. So:
  1. the samples' mean and variance must match that exact prediction within SAMPLING ERROR alone: |z| < 5 per
     pixel and for the pixel-pooled z, where z = (sample mean - m) / sqrt(v / n) and (sample var - v) / (v sqrt(2 /
     (n - 1))) (Gaussian: these standard errors are exact). This checks the whole sampler (original timesteps
     reaching the model, tables, coefficients, noise scale, respacing) with no tolerance to tune.
  2. that exact prediction must be close to N(mu, s^2): the chain's discretization bias. Its size is computed by
     the same recursion and stated per case below (for s in [0.3, 0.6]); the test asserts the samples meet it.
P(false failure) per check ~ 32 pixels * 6e-7: negligible.
"""
import math

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import NoiseSchedule
from oracles import GaussianOracle, assert_moments, exact_moments

SHAPE = (2, 4, 4)
Z_MAX = 5.0


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _data(gen):
    mu = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 0.8 - 0.4
    s = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 0.3 + 0.3
    return mu, s


# (steps, spacing, sampler, eta, prediction, variance, var_value, n, mean tol, std rel tol): the tolerances of
# check 2 are the float64 recursion's discretization bias (rounded up; fewer steps -> larger bias, mostly a too
# small variance; DDIM's mean bias comes from x_T ~ N(0, 1) instead of N(sqrt(abar_T) mu, 1 - abar_T)), to which
# the test adds 5 standard errors of the n samples.
CASES = [  # the exact chain's bias for s in [0.3, 0.6]: largest |mean - mu|, std / s - 1 range
    (None, "linspace", "ddpm", 0.0, "eps", "fixed_small", None, 4096, 1e-4, 0.013),  # 6e-6, -1.2 .. -0.7 %
    (None, "linspace", "ddpm", 0.0, "eps", "fixed_large", None, 4096, 1e-4, 0.004),  # 6e-6, +0.1 .. +0.3 %
    (1000, "linspace", "ddim", 0.0, "eps", "fixed_small", None, 4096, 2e-3, 0.005),  # 1.5e-3, -0.5 .. -0.3 %
    (100, "linspace", "ddpm", 0.0, "v", "fixed_large", None, 8192, 1e-4, 0.04),      # 6e-6, +1.2 .. +3.7 %
    (50, "trailing", "ddpm", 0.0, "x0", "learned_range", 0.3, 8192, 1e-4, 0.04),     # 6e-6, -3.6 .. -2.9 %
    (50, "leading", "ddim", 0.0, "v", "fixed_small", None, 8192, 2e-3, 0.085),       # 1.8e-3, -8.3 .. -4.8 %
    (100, "linspace", "ddim", 1.0, "eps", "fixed_small", None, 8192, 1e-4, 0.095),   # 6e-6, -9.4 .. -5.6 %
    (20, "linspace", "ddim", 0.5, "x0", "fixed_small", None, 8192, 1e-3, 0.23),      # 5e-4, -22 .. -14 %
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0] or 'T'}-{c[1]}-{c[2]}{c[3]:g}-{c[4]}-{c[5]}")
def test_oracle_samples_match_the_exact_chain_and_the_data(seed, case):
    steps, spacing, sampler, eta, prediction, variance, var_value, n, mean_tol, std_tol = case
    base = NoiseSchedule.linear(1000)
    mu, s = _data(torch.Generator().manual_seed(seed))
    model = GaussianOracle(base, mu, s, prediction, var_value)
    x = ddpm_fast.sample(model, n, steps, shape=SHAPE, schedule=base, prediction=prediction, variance=variance,
                         sampler=sampler, eta=eta, clip=False, seed=seed, progress=False, spacing=spacing,
                         batch_size=n)
    chain = base if steps is None else base.respace(steps, spacing)
    assert model.calls == chain.num_steps  # one chunk, one model call per step
    m, v = exact_moments(chain, mu, s, sampler, variance, eta, var_value or 0.0)
    assert_moments(x, m, v, f"{case}")
    # 2. the data distribution, within the stated discretization tolerance (+ 5 standard errors)
    xd = x.double().numpy()
    se_mean, se_std = s.numpy() / math.sqrt(n), 1 / math.sqrt(2 * (n - 1))
    assert np.all(np.abs(xd.mean(0) - mu.numpy()) <= mean_tol + Z_MAX * se_mean), f"{case}: mean off mu"
    assert np.all(np.abs(xd.std(0, ddof=1) / s.numpy() - 1) <= std_tol + Z_MAX * se_std), f"{case}: std off s"


def test_stated_tolerances_cover_the_discretization_bias():
    """The tolerances in CASES really bound the exact chain's bias for s in [0.3, 0.6], mu in [-0.4, 0.4]."""
    base = NoiseSchedule.linear(1000)
    mu = torch.linspace(-0.4, 0.4, 7).repeat(7, 1)
    s = torch.linspace(0.3, 0.6, 7)[:, None].repeat(1, 7)
    for steps, spacing, sampler, eta, _, variance, var_value, _, mean_tol, std_tol in CASES:
        chain = base if steps is None else base.respace(steps, spacing)
        m, v = exact_moments(chain, mu, s, sampler, variance, eta, var_value or 0.0)
        assert np.abs(m - mu.numpy()).max() <= mean_tol
        assert np.abs(np.sqrt(v) / s.numpy() - 1).max() <= std_tol


def test_same_seed_same_samples_and_chunks_equal_one_batch(seed):
    """Bitwise: the noise of sample j is a function of (seed, step, element) only, and the oracle is elementwise;
    13 * 27 elements per chunk makes offsets that are not multiples of Philox's group of 4."""
    base = NoiseSchedule.linear(40)
    shape = (3, 3, 3)
    mu, s = torch.zeros(shape) + 0.1, torch.ones(shape) * 0.5
    model = GaussianOracle(base, mu, s)
    kw = dict(shape=shape, schedule=base, seed=seed, progress=False)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.7)):
        whole = ddpm_fast.sample(model, 40, sampler=sampler, eta=eta, **kw)
        again = ddpm_fast.sample(model, 40, sampler=sampler, eta=eta, **kw)
        chunked = ddpm_fast.sample(model, 40, batch_size=13, sampler=sampler, eta=eta, **kw)
        assert torch.equal(whole, again) and torch.equal(whole, chunked)
        assert ddpm_fast.sampling.last_run_info()["chunks"] == 4
        other = ddpm_fast.sample(model, 40, sampler=sampler, eta=eta, **{**kw, "seed": seed + 1})
        assert (other - whole).abs().mean() > 0.1
        # the first samples of a larger call are the samples of a smaller one
        assert torch.equal(ddpm_fast.sample(model, 7, sampler=sampler, eta=eta, **kw), whole[:7])
