"""NoiseSchedule: beta schedules vs the papers and diffusers, respacing rule, tables, caching, serialisation."""
import json
import math

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion.schedule import ROW, ROWS, spaced_timesteps

try:
    import diffusers
except ImportError:  # the parity tests skip; every other test here needs only NumPy and torch
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers not installed (parity tests)")


def _diffusers_betas(name, T, **kw):
    return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=name, **kw).betas.double().numpy()


@needs_diffusers
@pytest.mark.parametrize("T", [10, 1000])
def test_beta_schedules_match_diffusers(T):
    # diffusers computes betas in float32: agreement to float32 rounding.
    cases = [(NoiseSchedule.linear(T), "linear", {}),
             (NoiseSchedule.cosine(T), "squaredcos_cap_v2", {}),
             (NoiseSchedule.scaled_linear(T), "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
             (NoiseSchedule.sigmoid(T), "sigmoid", {})]
    for ours, name, kw in cases:
        np.testing.assert_allclose(ours.betas, _diffusers_betas(name, T, **kw), rtol=3e-6, atol=1e-9, err_msg=name)


def test_betas_match_paper_formulas():
    T = 1000
    np.testing.assert_array_equal(NoiseSchedule.linear(T, 1e-4, 0.02).betas, np.linspace(1e-4, 0.02, T))
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(NoiseSchedule.cosine(T).betas, np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)
    assert NoiseSchedule.cosine(T).betas[-1] == 0.999  # the cap binds at the end


def test_tables_match_float64_formulas():
    s = NoiseSchedule.cosine(50).respace(13, "trailing")
    b = s.betas
    abar = np.cumprod(1 - b)
    prev = np.append(1.0, abar[:-1])
    post_var = b * (1 - prev) / (1 - abar)
    expect = {
        "alphas_cumprod": abar, "alphas_cumprod_prev": prev, "one_minus_alphas_cumprod_prev": 1 - prev,
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar), "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
        "posterior_mean_coef1": b * np.sqrt(prev) / (1 - abar),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - b) / (1 - abar),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "fixed_large_log_variance": np.log(np.append(post_var[1], b[1:])),
        "log_betas": np.log(b), "snr": abar / (1 - abar),
    }
    t64 = s.tables("cpu", torch.float64)
    t32 = s.tables("cpu")
    for name, want in expect.items():
        np.testing.assert_allclose(getattr(t64, name).numpy(), want, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(getattr(t32, name).numpy(), want, rtol=2e-7, err_msg=name)
    assert t32.packed.dtype == torch.float32 and t32.packed.shape == (len(ROWS), 13) and t32.packed.is_contiguous()
    assert t32.timesteps.dtype == torch.int64 and torch.equal(t32.timesteps, s.timesteps)
    assert t32.posterior_std.data_ptr() == t32.packed[ROW["posterior_std"]].data_ptr()


def test_tables_cached_per_device_and_dtype():
    s = NoiseSchedule.linear(20)
    assert s.tables("cpu") is s.tables(torch.device("cpu"))
    assert s.tables("cpu", torch.float64) is not s.tables("cpu")
    with pytest.raises(ValueError, match="dtype"):
        s.tables("cpu", torch.float16)


@needs_diffusers
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 13), (1000, 1), (1000, 1000), (100, 7), (37, 36)])
def test_respacing_matches_diffusers_set_timesteps(T, steps, spacing):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    theirs = sched.timesteps.numpy()[::-1]
    ours = spaced_timesteps(T, steps, spacing)
    # diffusers' trailing arange sometimes grows a (steps+1)-th value, timestep -1: we keep the valid ones.
    np.testing.assert_array_equal(ours, theirs[theirs >= 0][-steps:] if spacing == "trailing" else theirs)
    assert len(ours) == steps and len(set(ours.tolist())) == steps and ours.min() >= 0 and ours.max() < T


def test_respace_recomputes_betas_from_kept_alphas_cumprod():
    base = NoiseSchedule.linear(1000)
    s = base.respace(25, "leading")
    kept = s.timesteps.numpy()
    np.testing.assert_allclose(s.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    abar = base.alphas_cumprod[kept]
    np.testing.assert_allclose(s.betas, 1 - abar / np.append(1.0, abar[:-1]), rtol=1e-12)
    assert s.T == 1000 and s.num_steps == 25 and len(s) == 25 and s.is_respaced
    assert s.respace(25, "leading") == s            # respacing always starts from the training schedule
    assert base.respace(1000) == base               # every step kept: the same chain
    assert s.timesteps.dtype == torch.int64 and bool((s.timesteps[1:] > s.timesteps[:-1]).all())


def test_equality_hash_and_key():
    a, b = NoiseSchedule.linear(100), NoiseSchedule.linear(100)
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert a != NoiseSchedule.linear(100, beta_end=0.03) and a != a.respace(10)
    assert a.respace(10) == b.respace(10) and a.respace(10) != a.respace(10, "trailing")
    assert len({a: 1, b: 2}) == 1
    assert NoiseSchedule(betas=a.betas) == a        # equality is by content


@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(50, 2e-4, 0.03),
                                  lambda: NoiseSchedule.cosine(64, s=0.01, max_beta=0.99).respace(9, "trailing"),
                                  lambda: NoiseSchedule.sigmoid(30).respace(4, "leading"),
                                  lambda: NoiseSchedule.scaled_linear(40),
                                  lambda: NoiseSchedule(betas=np.random.default_rng(0).uniform(1e-3, 0.1, 17))])
def test_dict_round_trip(make):
    s = make()
    d = json.loads(json.dumps(s.to_dict()))
    r = NoiseSchedule.from_dict(d)
    assert r == s and r.T == s.T and torch.equal(r.timesteps, s.timesteps)
    np.testing.assert_array_equal(r.betas, s.betas)
    assert "NoiseSchedule(" in repr(s)


@pytest.mark.parametrize("betas,match", [
    ([0.1, float("nan")], "finite"), ([0.1, float("inf")], "finite"), ([0.0, 0.1], r"\(0, 1\)"),
    ([0.1, 1.0], r"\(0, 1\)"), ([-0.1, 0.2], r"\(0, 1\)"), ([], "non-empty"), ([[0.1, 0.2]], "1-D"),
    ("abc", "floats"), ([1e-18, 0.1], "strictly decreasing"), ([0.1, 1e-18], "strictly decreasing"),
])
def test_bad_betas(betas, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(betas=betas)


def test_bad_arguments():
    s = NoiseSchedule.linear(100)
    for steps in (0, 101, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            s.respace(steps)
    with pytest.raises(ValueError, match="spacing"):
        s.respace(10, "quadratic")
    for T in (0, -5, 10.0):
        with pytest.raises(ValueError, match="T"):
            NoiseSchedule.linear(T)
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule.linear(10, beta_start=0.0)
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule.from_dict({"kind": "exotic"})
    with pytest.raises(ValueError, match="parameters"):
        NoiseSchedule.from_dict({"kind": "linear", "T": 10, "bogus": 1})
    with pytest.raises(AttributeError, match="rows are"):
        s.tables().not_a_row


def test_single_step_chain_is_finite():
    s = NoiseSchedule.linear(1000).respace(1)
    t = s.tables("cpu", torch.float64)
    assert torch.isfinite(t.packed).all() and s.timesteps.tolist() == [0]
    assert math.isclose(float(t.betas[0]), 1e-4, rel_tol=1e-12)
