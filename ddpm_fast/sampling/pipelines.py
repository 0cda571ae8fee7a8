"""diffusers pipelines as ``sample``'s model: a DDPMPipeline or DDIMPipeline gives its unet, its scheduler's
training schedule (``DiffusionConfig.from_diffusers``) and the sampler its scheduler implies.

``SCHEDULER_SAMPLERS`` maps a scheduler class name to a function of the scheduler's config returning the
sample() settings it implies (sampler, eta); add a row to support another scheduler. The timestep spacing and
steps_offset come from the scheduler config too ("leading" spacing is diffusers' DDPM / DDIM default; the
offset applies to "leading" only, as in diffusers). Arguments given to ``sample`` explicitly win.
No diffusers import: pipelines are recognised by their ``unet`` and ``scheduler`` attributes.
"""
from dataclasses import dataclass
from typing import Tuple

from torch import nn

from ..diffusion import DiffusionConfig


def _ddpm(config: dict) -> dict:
    return {"sampler": "ddpm", "eta": 0.0}


def _ddim(config: dict) -> dict:
    if config.get("set_alpha_to_one", True) is False:
        raise ValueError("unsupported DDIMScheduler config: set_alpha_to_one=False (ddpm_fast's DDIM ends at "
                         "alphas_cumprod = 1, diffusers' set_alpha_to_one=True)")
    return {"sampler": "ddim", "eta": 0.0}  # DDIMPipeline's default eta


SCHEDULER_SAMPLERS = {"DDPMScheduler": _ddpm, "DDIMScheduler": _ddim}


@dataclass(frozen=True)
class PipelineDefaults:
    """What a pipeline supplies to ``sample``: the network, how it was trained, and the sampling settings."""
    model: object
    diffusion: DiffusionConfig
    shape: Tuple[int, int, int]
    sampler: str
    eta: float
    spacing: str
    offset: int


def is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module) and hasattr(obj, "unet") and hasattr(obj, "scheduler")


def from_pipeline(pipe) -> PipelineDefaults:
    """The PipelineDefaults of a diffusers DDPMPipeline / DDIMPipeline (ValueError for other schedulers)."""
    scheduler, unet = pipe.scheduler, pipe.unet
    name = type(scheduler).__name__
    if name not in SCHEDULER_SAMPLERS:
        raise ValueError(f"sample() takes pipelines whose scheduler is one of {sorted(SCHEDULER_SAMPLERS)}; this "
                         f"{type(pipe).__name__} has a {name}: pass its unet and schedule= "
                         f"NoiseSchedule.from_diffusers(scheduler) instead")
    config = dict(scheduler.config)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(unet.config.in_channels), *map(int, size))
    spacing = config.get("timestep_spacing", "leading")
    return PipelineDefaults(model=unet, diffusion=DiffusionConfig.from_diffusers(scheduler, shape), shape=shape,
                            spacing=spacing, offset=int(config.get("steps_offset", 0)) if spacing == "leading" else 0,
                            **SCHEDULER_SAMPLERS[name](config))
