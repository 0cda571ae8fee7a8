"""pytest-benchmark suite for the diffusion ops (CI runs it once with --benchmark-disable so it cannot rot).

    pytest benchmarks/test_bench_diffusion_ops.py                 # timed, on this machine
Comparison tables with interleaved variants: benchmarks/bench_diffusion_ops.py.
"""
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.ops.p_step import p_step, p_step_ref, seeded_randn
from ddpm_fast.ops.q_sample import q_sample

SHAPE = (16, 3, 32, 32)
SCHED = NoiseSchedule.linear(1000)


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    return x, torch.randn_like(x), torch.empty_like(x), torch.tensor([7])


@pytest.mark.parametrize("backend", [None, "torch"])
def test_p_step_fused(benchmark, inputs, backend):
    x, mo, out, seed = inputs
    result = benchmark(p_step, SCHED, mo, x, 500, seed=seed, out=out, backend=backend)
    assert result is out and torch.isfinite(out).all()


def test_p_step_separate_torch_ops(benchmark, inputs):
    x, mo, _, _ = inputs
    result = benchmark(lambda: p_step_ref(SCHED, mo, x, 500, noise=torch.randn_like(x)))
    assert result.shape == SHAPE


def test_diffusers_ddpm_step(benchmark, inputs):
    diffusers = pytest.importorskip("diffusers")
    x, mo, _, _ = inputs
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    result = benchmark(lambda: sched.step(mo, 500, x, generator=gen).prev_sample)
    assert result.shape == SHAPE


def test_q_sample_fused(benchmark, inputs):
    x, _, _, seed = inputs
    t = torch.randint(0, 1000, (SHAPE[0],))
    x_t, eps = benchmark(q_sample, SCHED, x, t, seed=seed)
    assert x_t.shape == eps.shape == SHAPE


def test_seeded_randn(benchmark, inputs):
    _, _, out, seed = inputs
    assert benchmark(seeded_randn, None, seed, out=out) is out
