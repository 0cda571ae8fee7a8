"""ddpm_fast.sample with class labels and classifier-free guidance: the exact output law of every sampler under
guidance (Gaussian oracle), w = 0 / w = 1 bitwise the unconditional / conditional chains with no guidance work, a
guided U-Net chain against the naive two-call loop, chunks and seeds, sample_to_dir's labels, and bad input
refused before any work. (The fused guided steps themselves: tests/ops/test_guidance.py; one graph serving any
labels and w: tests/sampling/test_sample.py.)"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import ddpm_fast
from ddpm_fast import NoiseSchedule, UNet, sample_to_dir
from ddpm_fast.diffusion import solvers
from ddpm_fast.images import to_uint8
from ddpm_fast.ops.noise import STREAM_P_STEP, philox_noise, seeded_randn
from ddpm_fast.ops.p_step import p_step_ref
from ddpm_fast.sampling import last_run_info
from ddpm_fast.sampling.conditioning import DEFAULT_GUIDANCE_SCALE

from oracles import (GuidedGaussianOracle, assert_moments, exact_moments, exact_solver_moments, gaussian_x0,
                     guided_x0)

SHAPE = (2, 4, 4)
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _oracle(seed, prediction="eps", classes=3, var_value=None, var_null=None, T=1000):
    """A GuidedGaussianOracle with random per-class and unconditional Gaussians (mu in [-0.4, 0.4], s in [0.3,
    0.6]), its training schedule and the (mu, s) rows."""
    base = NoiseSchedule.linear(T)
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand((classes + 1, *SHAPE), generator=g, dtype=torch.float64) * 0.8 - 0.4
    s = torch.rand((classes + 1, *SHAPE), generator=g, dtype=torch.float64) * 0.3 + 0.3
    return GuidedGaussianOracle(base, mu, s, prediction, var_value, var_null), base, mu, s


# ---- exact output laws under guidance ----------------------------------------------------------------------------
# Per pixel the conditional and unconditional oracles' eps are affine in x, so the guided eps (and the x0 a step
# derives from it) is too: every sampler's output is then exactly Gaussian, its mean and variance given by the
# sampler's own recursion run on the guided affine data prediction in float64 (oracles.guided_x0). Samples of
# two classes, alternating in the batch and drawn in two chunks, must match their class's exact law within
# sampling error (5 standard errors per pixel and pooled: a false failure ~1e-4 per case). A learned-range
# output's variance half differs between labels and the null label: only the conditional one is right.

CASES = [  # (sampler, eta, steps, spacing, prediction, variance, w)
    ("ddpm", 0.0, 100, "linspace", "eps", "fixed_small", 3.0),
    ("ddpm", 0.0, 50, "trailing", "x0", "learned_range", 2.5),
    ("ddim", 0.0, 50, "trailing", "v", "fixed_small", 4.0),
    ("ddim", 1.0, 20, "linspace", "eps", "fixed_large", 1.5),
    ("dpmpp_2m", 0.0, 10, "logsnr", "eps", "fixed_small", 3.0),
    ("dpmpp_3m", 0.0, 20, "trailing", "v", "fixed_small", 2.0),
    ("dpmpp_2m_sde", 0.0, 15, "logsnr", "x0", "fixed_small", 2.5),
    ("unipc", 0.0, 8, "leading", "eps", "learned_range", 3.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_guided_samples_follow_the_exact_law_of_every_sampler(seed, case):
    sampler, eta, steps, spacing, prediction, variance, w = case
    learned = variance == "learned_range"
    model, base, mu, s = _oracle(seed, prediction, var_value=0.3 if learned else None, var_null=-0.8)
    n, classes = 8192, (0, 2)
    labels = torch.tensor(classes).repeat(n // 2)
    x = ddpm_fast.sample(model, n, steps, shape=SHAPE, schedule=base, prediction=prediction, variance=variance,
                         sampler=sampler, eta=eta, clip=False, seed=seed, progress=False, spacing=spacing,
                         batch_size=n // 2, labels=labels, guidance_scale=w)
    chain = base.respace(steps, spacing)
    assert model.batches == [n] * (2 * chain.num_steps)  # ONE call of 2B samples per step and chunk
    assert last_run_info()["conditioning"] == "guided" and last_run_info()["guidance_scale"] == w
    uncond = gaussian_x0(mu[-1].numpy(), s[-1].numpy())
    for k in classes:
        law = guided_x0(gaussian_x0(mu[k].numpy(), s[k].numpy()), uncond, w)
        if sampler in solvers.SOLVERS:
            m, v = exact_solver_moments(chain, mu[k], s[k], sampler, x0=law)
        else:
            m, v = exact_moments(chain, mu[k], s[k], sampler, variance, eta, 0.3, x0=law)
        assert_moments(x[labels == k], m, v, f"{case} class {k}")


def test_the_exact_guided_law_is_not_the_unguided_one(seed):
    """The oracle test can fail: for the cases above the guided law differs from the conditional (w = 1) and the
    unconditional (w = 0) laws by many standard errors of 4096 samples."""
    _, base, mu, s = _oracle(seed)
    uncond, cond = gaussian_x0(mu[-1].numpy(), s[-1].numpy()), gaussian_x0(mu[0].numpy(), s[0].numpy())
    chain = base.respace(50, "trailing")
    m2, v2 = exact_moments(chain, mu[0], s[0], "ddim", x0=guided_x0(cond, uncond, 4.0))
    for other in (cond, uncond):
        m, v = exact_moments(chain, mu[0], s[0], "ddim", x0=other)
        assert np.abs(m2 - m).max() / np.sqrt(v.max() / 4096) > 20


# ---- w = 0 and w = 1 ------------------------------------------------------------------------------------------------

class FixedLabels(nn.Module):
    """A conditional model with its labels fixed: the conditional model as an unconditional one."""

    def __init__(self, model, labels):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x, t):
        return self.model(x, t, self.labels[:x.shape[0]])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m_sde", "unipc"])
def test_w_zero_is_the_unconditional_model_and_w_one_the_conditional_one_bitwise(seed, sampler):
    """w = 0: the images of labels=None, B samples per model call; w = 1: the model with the labels, B samples
    per call, bitwise the conditional model run as a plain model; neither does guidance work."""
    model, base, _, _ = _oracle(seed, T=100)
    labels = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(shape=SHAPE, schedule=base, sampler=sampler, seed=seed, progress=False, clip=False, steps=10)
    plain = ddpm_fast.sample(model, 5, **kw)
    model.batches.clear()
    assert torch.equal(ddpm_fast.sample(model, 5, labels=labels, guidance_scale=0.0, **kw), plain)
    assert model.batches == [5] * 10 and last_run_info()["conditioning"] == "none"
    model.batches.clear()
    cond = ddpm_fast.sample(model, 5, labels=labels, guidance_scale=1, **kw)
    assert model.batches == [5] * 10 and last_run_info()["conditioning"] == "labels"
    assert torch.equal(cond, ddpm_fast.sample(FixedLabels(model, labels), 5, **kw))
    assert (cond - plain).abs().max() > 1e-2
    guided = ddpm_fast.sample(model, 5, labels=labels, guidance_scale=DEFAULT_GUIDANCE_SCALE, **kw)
    assert torch.equal(ddpm_fast.sample(model, 5, labels=labels, **kw), guided)  # the default scale
    assert (guided - cond).abs().max() > 1e-2


def _naive_guided_chain(unet, n, steps, seed, labels, w, sampler="ddpm"):
    """What sample(unet, labels=..., guidance_scale=w) computes, written the naive way: two model calls per step
    (labels, then the null label), the combine and the step's reference, the same Philox noise."""
    schedule = unet.diffusion.make_schedule().respace(steps, "linspace")
    x = seeded_randn((n, *unet.diffusion.image_shape), seed)
    for i in reversed(range(steps)):
        t = torch.full((n,), int(schedule.timesteps[i]), dtype=torch.int64)
        out = torch.cat([unet(x, t, labels), unet(x, t)]) if w != 1 else unet(x, t, labels)
        z = philox_noise(x, seed, i, STREAM_P_STEP, 0)
        cfg = unet.diffusion
        x = p_step_ref(schedule, out, x, i, prediction=cfg.prediction, variance=cfg.variance, clip=cfg.clip,
                       sampler=sampler, noise=z, guidance_scale=None if w == 1 else w)
    return x.clamp(-1, 1)


def test_a_guided_unet_chain_is_the_naive_two_call_loop(seed):
    """The tiny conditional U-Net (precomputed class conditioning, channels_last twin, one call of 2B) against the
    naive loop: equal up to the U-Net's rounding (batch 2B vs B, split projections), for w = 3 and w = 1."""
    torch.manual_seed(seed)
    unet = UNet.preset("tiny", ch_mult=(1, 2), num_classes=4).eval()
    with torch.no_grad():
        unet.class_embedding.weight.mul_(4)  # labels that matter after no training
    labels = torch.tensor([0, 3, 1, 4, 2])  # 4: the null label, an unconditional image
    runs = {}
    for w in (3.0, 1.0):
        runs[w] = ddpm_fast.sample(unet, 5, 6, seed=seed, labels=labels, guidance_scale=w, spacing="linspace",
                                   progress=False)
        with torch.no_grad():
            want = _naive_guided_chain(unet, 5, 6, seed, labels, w)
        torch.testing.assert_close(runs[w], want, rtol=0, atol=1e-4)
    assert (runs[3.0] - runs[1.0])[[0, 1, 2, 4]].abs().amax(dim=(1, 2, 3)).min() > 1e-3  # guidance changed them
    torch.testing.assert_close(runs[3.0][3], runs[1.0][3], rtol=0, atol=1e-5)  # the null label: c = u


# ---- chunks, seeds, info ----------------------------------------------------------------------------------------

def test_chunks_take_their_rows_of_the_labels(seed):
    """Chunked == unchunked bitwise (an elementwise model): each chunk gets its own labels, and start= places a
    call in a longer run with its labels."""
    model, base, _, _ = _oracle(seed, T=100)
    labels = torch.randint(0, 4, (11,), generator=torch.Generator().manual_seed(seed))
    kw = dict(shape=SHAPE, schedule=base, seed=seed, progress=False, steps=8, guidance_scale=2.5)
    whole = ddpm_fast.sample(model, 11, labels=labels, **kw)
    assert torch.equal(ddpm_fast.sample(model, 11, labels=labels, batch_size=4, **kw), whole)
    assert torch.equal(ddpm_fast.sample(model, 3, labels=labels[4:7], batch_size=4, start=4, **kw), whole[4:7])
    one = ddpm_fast.sample(model, 11, labels=labels.tolist(), **kw)
    assert torch.equal(one, whole)
    info = last_run_info()
    assert info["conditioning"] == "guided" and info["guidance_scale"] == 2.5
    assert torch.equal(ddpm_fast.sample(model, 11, labels=2, **kw), ddpm_fast.sample(model, 11, labels=[2] * 11, **kw))
    assert not torch.equal(ddpm_fast.sample(model, 11, labels=2, **kw)[:4], whole[:4])


# ---- sample_to_dir ----------------------------------------------------------------------------------------------

def test_sample_to_dir_records_the_labels_and_writes_them_as_arr_1(tmp_path, seed):
    torch.manual_seed(seed)
    unet = UNet.preset("tiny", ch_mult=(1, 2), num_classes=3)
    labels = [0, 1, 2, 3, 2, 2, 0]
    kw = dict(steps=3, seed=seed, batch_size=3, labels=labels, guidance_scale=2.0)
    run = sample_to_dir(unet, 7, tmp_path / "run", progress=False, **kw)
    want = to_uint8(ddpm_fast.sample(unet, 7, progress=False, **kw))
    with np.load(run.path) as f:
        assert f.files == ["arr_0", "arr_1"]
        assert np.array_equal(f["arr_0"], want)
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == labels
    settings = json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]
    assert settings["guidance_scale"] == 2.0 and settings["conditioning"] == "guided"
    assert settings["labels"]["shape"] == [7] and settings["labels"]["dtype"] == "torch.int64"
    for other, name in ((dict(labels=labels[::-1]), "labels"), (dict(guidance_scale=3.0), "guidance_scale")):
        with pytest.raises(ValueError, match=f"holds a run with other settings: .*{name}"):
            sample_to_dir(unet, 7, tmp_path / "run", progress=False, **{**kw, **other})
    plain = sample_to_dir(unet, 7, tmp_path / "plain", progress=False, steps=3, seed=seed, batch_size=3)
    with np.load(plain.path) as f:
        assert f.files == ["arr_0"]


# ---- bad input ---------------------------------------------------------------------------------------------------

class Refuses(nn.Module):
    """A model that must never run."""
    null_label = 3

    def forward(self, x, t, y=None):
        raise AssertionError("the model ran before the arguments were checked")


@pytest.mark.parametrize("labels, w, error, match", [
    ([0, 1], None, ValueError, r"one label per image: n = 4, got shape \(2,\)"),
    (torch.zeros(4, 1, dtype=torch.int64), None, ValueError, "one label per image"),
    ([0, 1, 2, 4], None, ValueError, r"labels must be classes 0..2 \(or 3, the null label"),
    (-1, None, ValueError, r"got values in \[-1, -1\]"),
    (torch.tensor([0.0, 1.0, 2.0, 0.0]), None, TypeError, "labels must hold integers, got torch.float32"),
    (np.array([True, False, True, False]), None, TypeError, "labels must hold integers, got torch.bool"),
    ([0, 1.5, 2, 0], None, TypeError, r"labels must be integers, got 1.5"),
    (True, None, TypeError, "labels must be an int"),
    ("7", None, TypeError, "labels must be an int, a sequence or tensor"),
    (None, 2.0, ValueError, "guidance_scale= needs labels="),
    (1, float("nan"), ValueError, "guidance_scale must be finite"),
    (1, "2", TypeError, "guidance_scale must be a float"),
    (1, True, TypeError, "guidance_scale must be a float"),
])
def test_bad_labels_and_scales_fail_before_the_model_runs(labels, w, error, match):
    with pytest.raises(error, match=match):
        ddpm_fast.sample(Refuses(), 4, 3, shape=SHAPE, schedule=NoiseSchedule.linear(10), labels=labels,
                         guidance_scale=w, progress=False)


def test_labels_need_a_class_conditional_model():
    unet = UNet.preset("tiny", ch_mult=(1, 2))
    with pytest.raises(ValueError, match=r"this UNet is unconditional \(UNetConfig.num_classes=None\)"):
        ddpm_fast.sample(unet, 2, 3, labels=1, progress=False)

    class Plain(nn.Module):
        def forward(self, x, t):
            raise AssertionError("ran")
    with pytest.raises(ValueError, match="Plain has no null_label"):
        ddpm_fast.sample(Plain(), 2, 3, shape=SHAPE, schedule=NoiseSchedule.linear(10), labels=1, progress=False)
    with pytest.raises(ValueError, match=r"guidance_scale= needs labels="):
        sample_to_dir(unet, 2, "/nonexistent-dir-never-created", steps=3, guidance_scale=2.0, progress=False)


# ---- GPU: CUDA graphs of guided chains (skipped without CUDA) ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("graph", ["whole", "step"])
def test_cuda_guided_graph_equals_eager_and_serves_any_labels_and_w(seed, graph):
    """A captured guided chain of the conditional U-Net (class conditioning precomputed inside the graph, the
    combine in the Triton step) equals the eager chain bitwise, and one capture replays other labels and w."""
    from ddpm_fast.sampling import clear_graph_cache
    clear_graph_cache()
    torch.manual_seed(seed)
    unet = UNet.preset("tiny", ch_mult=(1, 2), num_classes=3).cuda()
    with torch.no_grad():
        unet.class_embedding.weight.mul_(4)
    captures = 0
    for labels, w in (([0, 1, 2, 3], 2.0), ([2, 2, 1, 0], 4.5), ([1, 0, 3, 2], 3.0)):
        kw = dict(seed=seed, progress=False, labels=labels, guidance_scale=w)
        eager = ddpm_fast.sample(unet, 4, 12, cuda_graph=False, **kw)
        graphed = ddpm_fast.sample(unet, 4, 12, graph=graph, **kw)
        info = last_run_info()
        assert info["modes"] == [f"graph-{graph}"] and info["conditioning"] == "guided"
        captures += len(info["captures"])
        assert torch.equal(eager, graphed), (labels, w)
    assert captures == 1
    bf16 = ddpm_fast.sample(unet, 4, 12, seed=seed, progress=False, labels=[0, 1, 2, 3], dtype=torch.bfloat16)
    assert torch.isfinite(bf16).all() and last_run_info()["modes"] == ["graph-whole"]
