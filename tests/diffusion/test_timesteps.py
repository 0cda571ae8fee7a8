"""Timestep grids: NoiseSchedule.respace(timesteps=...) for any integer grid, and the log-SNR-uniform spacing."""
import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion.schedule import logsnr_timesteps


def _lam(abar):
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def test_explicit_timesteps_in_either_order_give_the_same_chain():
    base = NoiseSchedule.linear(1000)
    ts = [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]  # diffusers' DPM-Solver default grid, descending
    down, up = base.respace(timesteps=ts), base.respace(timesteps=sorted(ts))
    assert down == up and down.key == up.key and down.num_steps == 10
    assert down.timesteps.tolist() == sorted(ts)
    np.testing.assert_allclose(down.alphas_cumprod, base.alphas_cumprod[sorted(ts)], rtol=1e-12)
    assert base.respace(timesteps=torch.tensor(ts)) == down  # a tensor (e.g. scheduler.timesteps) works too
    assert base.respace(timesteps=np.array(ts, dtype=np.float32)) == down  # whole floats are fine
    spaced = base.respace(10, "linspace")
    assert base.respace(timesteps=spaced.timesteps.tolist()) == spaced  # the same chain as the spacing rule
    assert NoiseSchedule.from_dict(down.to_dict()) == down
    assert "given timesteps" in repr(down)
    assert down.respace(timesteps=range(1000)) is base  # every timestep: the training chain itself
    truncated = base.respace(timesteps=range(0, 500, 25))  # SDEdit-style: starts below T
    assert truncated.timesteps[-1] == 475 and truncated.num_steps == 20


@pytest.mark.parametrize("timesteps,match", [
    ([5, 3, 4], "strictly increasing or strictly decreasing"),
    ([1, 2, 2, 3], "strictly increasing or strictly decreasing"),
    ([-1, 5], r"lie in \[0, T\) = \[0, 100\)"),
    ([5, 100], r"lie in \[0, T\)"),
    ([1.5, 3], "must be integers"),
    ([], "non-empty"),
    ([[1, 2]], "1-D"),
    (["a", "b"], "must be integers"),
    ("abc", "1-D sequence"),
])
def test_bad_timesteps_are_refused(timesteps, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear(100).respace(timesteps=timesteps)


def test_respace_needs_steps_or_timesteps():
    base = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match="needs steps"):
        base.respace()
    with pytest.raises(ValueError, match="steps=3 but 2 timesteps"):
        base.respace(3, timesteps=[1, 2])
    with pytest.raises(ValueError, match="spacing must be one of"):
        base.respace(5, "uniform")


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.scaled_linear,
                                  NoiseSchedule.sigmoid])
@pytest.mark.parametrize("steps", [2, 5, 10, 20, 50, 100, 999])
def test_logsnr_grid_is_uniform_in_lambda_up_to_rounding(make, steps):
    """Both ends kept, strictly increasing integers (no zero-length step), at most ``steps`` of them, each the
    rounding of a lambda-uniform target: every target lies within half a timestep of a kept timestep."""
    base = make(1000)
    chain = base.respace(steps, "logsnr")
    ts = chain.timesteps.numpy()
    assert ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0) and len(ts) <= steps
    lam = _lam(base.alphas_cumprod)
    targets = np.linspace(lam[-1], lam[0], steps)
    t_exact = np.interp(targets, lam[::-1], np.arange(1000.0)[::-1])
    assert np.abs(t_exact[:, None] - ts[None, :]).min(axis=1).max() <= 0.5
    np.testing.assert_allclose(chain.alphas_cumprod, base.alphas_cumprod[ts], rtol=1e-12, atol=1e-15)


def test_logsnr_merges_only_near_t0_and_the_counts_the_docs_state():
    """Linear T=1000 (docs/solvers.md): 50 -> 49 steps, 100 -> 94; up to 20 nothing merges. Merged timesteps are
    the smallest ones, where one timestep spans more than a lambda step."""
    base = NoiseSchedule.linear(1000)
    assert [base.respace(k, "logsnr").num_steps for k in (5, 10, 20, 50, 100)] == [5, 10, 20, 49, 94]
    lam = _lam(base.alphas_cumprod)
    rounded = np.round(np.interp(np.linspace(lam[-1], lam[0], 100), lam[::-1], np.arange(1000.0)[::-1]))
    kept, count = np.unique(rounded, return_counts=True)
    assert kept[count > 1].max() < 10  # every merge happens among the first ten timesteps
    assert logsnr_timesteps(base.alphas_cumprod, 1).tolist() == [999]
