"""diffusers users' first lines work: a UNet2DModel's output object is unwrapped, a DDPMPipeline / DDIMPipeline is
a model for ``sample`` (its scheduler picks the sampler, spacing and steps_offset) and gives diffusers' images
with the same generator; NoiseSchedule.from_diffusers / DiffusionConfig.from_diffusers read every scheduler's
schedule fields, the solvers' included. Skipped without diffusers."""
import pytest
import torch

import ddpm_fast
from ddpm_fast import DiffusionConfig, NoiseSchedule, UNet
from ddpm_fast.sampling import last_run_info

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _unet2d():
    torch.manual_seed(0)
    return UNet.preset("tiny", ch_mult=(1, 2)).to_diffusers().eval()


def test_unet2d_output_objects_and_tuples_are_unwrapped(seed):
    unet2d = _unet2d()
    ours = UNet.from_diffusers(unet2d).eval()
    kw = dict(shape=(1, 8, 8), schedule=NoiseSchedule.linear(1000), seed=seed, progress=False)
    got = ddpm_fast.sample(unet2d, 3, 5, **kw)  # UNet2DModel returns UNet2DOutput(sample=...)
    torch.testing.assert_close(got, ddpm_fast.sample(ours, 3, 5, **kw), rtol=0, atol=1e-4)

    class TupleModel(torch.nn.Module):
        def forward(self, x, t):
            return unet2d(x, t, return_dict=False)  # (tensor,)
    torch.testing.assert_close(ddpm_fast.sample(TupleModel(), 3, 5, **kw), got, rtol=0, atol=0)

    class NoTensor(torch.nn.Module):
        def forward(self, x, t):
            return {"eps": x}
    with pytest.raises(ValueError, match=r"must return a tensor .* \.sample or as a tuple's first element"):
        ddpm_fast.sample(NoTensor(), 1, 2, **kw)


def test_ddpm_pipeline_is_a_model_and_gives_diffusers_images(seed):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", clip_sample=True)
    pipe = diffusers.DDPMPipeline(unet=_unet2d(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(seed), num_inference_steps=10,
                  output_type="np").images  # (N, H, W, C) in [0, 1]
    ours = ddpm_fast.sample(pipe, 3, 10, generator=torch.Generator().manual_seed(seed), progress=False)
    info = last_run_info()
    assert info["sampler"] == "ddpm" and info["steps"] == 10
    torch.testing.assert_close(ours * 0.5 + 0.5, torch.from_numpy(theirs).permute(0, 3, 1, 2), rtol=0, atol=1e-4)
    # the pipeline's own seed= path: its scheduler's settings, ddpm_fast's noise
    assert ddpm_fast.sample(pipe, 2, 10, seed=1, progress=False).shape == (2, 1, 8, 8)


def test_ddim_pipeline_honours_spacing_and_steps_offset(seed):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True, timestep_spacing="leading",
                                        steps_offset=1)
    pipe = diffusers.DDIMPipeline(unet=_unet2d(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=10, eta=0.0,
                  use_clipped_model_output=True, output_type="np").images
    ours = ddpm_fast.sample(pipe, 2, 10, generator=torch.Generator().manual_seed(seed), progress=False)
    assert last_run_info()["sampler"] == "ddim"
    torch.testing.assert_close(ours * 0.5 + 0.5, torch.from_numpy(theirs).permute(0, 3, 1, 2), rtol=0, atol=1e-4)
    # without the offset the timesteps (and so the images) differ: the offset is really used
    plain = ddpm_fast.sample(pipe, 2, 10, generator=torch.Generator().manual_seed(seed), spacing="leading",
                             progress=False)
    assert (plain - ours).abs().max() > 1e-3


def test_solver_pipelines_give_diffusers_images(seed):
    """A DDPMPipeline whose scheduler was swapped for DPMSolverMultistepScheduler runs dpmpp_2m on the scheduler's
    grid: diffusers' images with the same generator. UniPC (whose step() takes no generator, so DDPMPipeline
    cannot run it) gives what sample(sampler="unipc") gives on the scheduler's spacing."""
    unet2d = _unet2d()
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    pipe = diffusers.DDPMPipeline(unet=unet2d, scheduler=scheduler)
    ours = ddpm_fast.sample(pipe, 2, 8, generator=torch.Generator().manual_seed(seed), progress=False)
    assert last_run_info()["sampler"] == "dpmpp_2m"
    # DDPMPipeline's loop without its final clamp (the solvers' schedulers do not clip, and this untrained U-Net
    # leaves [-1, 1]): x_T from the generator, then scheduler.step on the scheduler's own grid
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet2d(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    for config, sampler in ((dict(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"), (dict(solver_order=3), "dpmpp_3m")):
        swapped = diffusers.DDPMPipeline(unet=unet2d, scheduler=diffusers.DPMSolverMultistepScheduler(**config))
        ddpm_fast.sample(swapped, 1, 4, seed=seed, progress=False)
        assert last_run_info()["sampler"] == sampler
    unipc_scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000)
    unipc = diffusers.DDPMPipeline(unet=unet2d, scheduler=unipc_scheduler)
    got = ddpm_fast.sample(unipc, 2, 6, seed=seed, progress=False)
    assert last_run_info()["sampler"] == "unipc"
    unipc_scheduler.set_timesteps(6)  # the scheduler's own grid, which the pipeline path must have used
    chain = NoiseSchedule.linear(1000).respace(timesteps=unipc_scheduler.timesteps)
    want = ddpm_fast.sample(UNet.from_diffusers(unet2d).eval(), 2, seed=seed, sampler="unipc", schedule=chain,
                            prediction="eps", variance="fixed_small", clip=False, progress=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # UNet2DModel vs the fused UNet: rounding
    assert unipc_scheduler.timesteps.tolist() != [int(t) for t in NoiseSchedule.linear(1000).respace(
        6, "linspace").timesteps.flip(0)]  # the scheduler's rule differs from DDPM's linspace: the grid matters


def test_pipelines_with_other_schedulers_are_refused_with_the_way_out():
    pipe = diffusers.DDPMPipeline(unet=_unet2d(), scheduler=diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler: pass its unet and schedule= "
                                         r"NoiseSchedule.from_diffusers\(scheduler\)"):
        ddpm_fast.sample(pipe, 1, 2, progress=False)
    pipe = diffusers.DDIMPipeline(unet=_unet2d(), scheduler=diffusers.DDIMScheduler(set_alpha_to_one=False))
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        ddpm_fast.sample(pipe, 1, 2, progress=False)
    for config, words in ((dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
                          (dict(solver_order=1), "solver_order=1"),
                          (dict(solver_type="heun"), "solver_type='heun'")):
        pipe = diffusers.DDPMPipeline(unet=_unet2d(), scheduler=diffusers.DPMSolverMultistepScheduler(**config))
        with pytest.raises(ValueError, match=words):
            ddpm_fast.sample(pipe, 1, 2, progress=False)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_noise_schedule_from_diffusers_is_the_schedulers(beta_schedule):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule=beta_schedule)
    ours = NoiseSchedule.from_diffusers(scheduler)
    assert ours.T == 200 and NoiseSchedule.from_diffusers(scheduler.config) == ours
    torch.testing.assert_close(torch.as_tensor(ours.alphas_cumprod, dtype=torch.float64),
                               scheduler.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)  # theirs in float32


def test_diffusion_config_from_every_scheduler():
    betas = torch.linspace(1e-4, 0.02, 50).tolist()
    cfg = DiffusionConfig.from_diffusers(diffusers.DDPMScheduler(trained_betas=betas, variance_type="fixed_large"))
    assert cfg.schedule == "custom" and cfg.T == 50 and cfg.variance == "fixed_large" and cfg.clip
    cfg = DiffusionConfig.from_diffusers(diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False,
                                                                 timestep_spacing="trailing", steps_offset=1))
    assert (cfg.prediction, cfg.clip) == ("v", False)
    assert cfg.extra["diffusers"]["timestep_spacing"] == "trailing" and cfg.extra["diffusers"]["steps_offset"] == 1
    assert cfg.extra["diffusers"]["diffusers_class"] == "DDIMScheduler"
    for solver in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler):
        cfg = DiffusionConfig.from_diffusers(solver(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
                                             image_shape=(1, 8, 8))
        assert (cfg.schedule, cfg.prediction, cfg.variance, cfg.clip) == ("cosine", "x0", "fixed_small", False)
        assert cfg.extra["diffusers"]["solver_order"] == 2 and cfg.image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="thresholding=True"):
        DiffusionConfig.from_diffusers(diffusers.DDPMScheduler(thresholding=True))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True"):
        NoiseSchedule.from_diffusers(diffusers.DDIMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(TypeError, match="expected a diffusers scheduler"):
        NoiseSchedule.from_diffusers(42)
