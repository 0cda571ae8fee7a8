"""diffusers pipelines as ``sample``'s model: a DDPMPipeline or DDIMPipeline (or one whose scheduler was swapped for
a DPMSolverMultistepScheduler or UniPCMultistepScheduler) gives its unet, its scheduler's
training schedule (``DiffusionConfig.from_diffusers``) and the sampler its scheduler implies.

``SCHEDULER_SAMPLERS`` maps a scheduler class name to a function of the scheduler's config returning the
sample() settings it implies (sampler, eta); add a row to support another scheduler. The timestep spacing and
steps_offset come from the scheduler config too ("leading" spacing is diffusers' DDPM / DDIM default; the
offset applies to "leading" only, as in diffusers); a solver scheduler's grid is the one its own set_timesteps
makes (its rules differ from DDPM's). Arguments given to ``sample`` explicitly win.
No diffusers import: pipelines are recognised by their ``unet`` and ``scheduler`` attributes.
"""
import copy
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from torch import nn

from ..diffusion import DiffusionConfig


def _ddpm(config: dict) -> dict:
    return {"sampler": "ddpm", "eta": 0.0}


def _ddim(config: dict) -> dict:
    if config.get("set_alpha_to_one", True) is False:
        raise ValueError("unsupported DDIMScheduler config: set_alpha_to_one=False (ddpm_fast's DDIM ends at "
                         "alphas_cumprod = 1, diffusers' set_alpha_to_one=True)")
    return {"sampler": "ddim", "eta": 0.0}  # DDIMPipeline's default eta


_SIGMA_OPTIONS = (("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
                  ("use_flow_sigmas", False), ("final_sigmas_type", "zero"), ("thresholding", False),
                  ("lower_order_final", True))


def _require(name: str, config: dict, fixed) -> None:
    """Refuses a scheduler config whose field differs from the value ddpm_fast's solver implements."""
    for field, ok in fixed:
        if config.get(field, ok) != ok:
            raise ValueError(f"unsupported {name} config: {field}={config[field]!r} (ddpm_fast runs {field}={ok!r})")


def _dpmsolver(config: dict) -> dict:
    algorithm, order = config.get("algorithm_type", "dpmsolver++"), config.get("solver_order", 2)
    want = {("dpmsolver++", 2): "dpmpp_2m", ("dpmsolver++", 3): "dpmpp_3m", ("sde-dpmsolver++", 2): "dpmpp_2m_sde"}
    if (algorithm, order) not in want:
        raise ValueError(f"unsupported DPMSolverMultistepScheduler config: algorithm_type={algorithm!r}, "
                         f"solver_order={order} (ddpm_fast runs {sorted(want)})")
    _require("DPMSolverMultistepScheduler", config, _SIGMA_OPTIONS + (
        ("solver_type", "midpoint"), ("euler_at_final", False), ("use_lu_lambdas", False)))
    return {"sampler": want[algorithm, order], "eta": 0.0}


def _unipc(config: dict) -> dict:
    _require("UniPCMultistepScheduler", config, _SIGMA_OPTIONS + (
        ("solver_type", "bh2"), ("solver_order", 2), ("predict_x0", True), ("disable_corrector", [])))
    return {"sampler": "unipc", "eta": 0.0}


SCHEDULER_SAMPLERS = {"DDPMScheduler": _ddpm, "DDIMScheduler": _ddim,
                      "DPMSolverMultistepScheduler": _dpmsolver, "UniPCMultistepScheduler": _unipc}


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
    grid: Optional[Callable] = None  # steps -> the scheduler's own timesteps (solver schedulers), else None


def _scheduler_grid(scheduler):
    """steps -> the original timesteps the scheduler itself would step through (its ``set_timesteps`` on a copy,
    so the user's scheduler is left alone): the solvers' schedulers space their grids by rules of their own."""
    def grid(steps):
        own = copy.deepcopy(scheduler)
        own.set_timesteps(steps)
        return [int(t) for t in own.timesteps]
    return grid


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
    settings = SCHEDULER_SAMPLERS[name](config)
    grid = _scheduler_grid(scheduler) if settings["sampler"] not in ("ddpm", "ddim") else None
    return PipelineDefaults(model=unet, diffusion=DiffusionConfig.from_diffusers(scheduler, shape), shape=shape,
                            spacing=spacing, offset=int(config.get("steps_offset", 0)) if spacing == "leading" else 0,
                            grid=grid, **settings)
