"""DiffusionConfig: how a model was trained (schedule, prediction, variance, clip, loss), the option names
(predictions, variances, samplers, schedules) that every sampler and op accepts, and the translation from and to
diffusers' scheduler configs (``DiffusionConfig.from_diffusers``, ``diffusers_scheduler_config``)."""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .schedule import DIFFUSERS_SCHEDULES, NoiseSchedule, diffusers_config
from .solvers import SOLVERS

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
STEP_SAMPLERS = ("ddpm", "ddim")       # one fused p_step per step (ops/p_step.py)
SAMPLERS = STEP_SAMPLERS + SOLVERS     # + the few-step solvers (diffusion/solvers.py, ops/solver_step.py)
SCHEDULES = ("linear", "cosine", "sigmoid", "scaled_linear", "custom")
# What ``sample(steps=None, spacing=None)`` uses per sampler (None steps: the schedule as given, i.e. all T steps
# of a training schedule). Chosen by measurement with the rule stated before it: docs/solvers.md, "Choosing a
# sampler" (benchmarks/quality_per_step.py; benchmarks/results/quality-digits.json).
DEFAULT_STEPS = {"ddpm": None, "ddim": 100, "dpmpp_2m": 100, "dpmpp_3m": 10, "dpmpp_2m_sde": 10, "unipc": 10}
DEFAULT_SPACING = {"ddpm": "linspace", "ddim": "trailing", "dpmpp_2m": "trailing", "dpmpp_3m": "logsnr",
                   "dpmpp_2m_sde": "trailing", "unipc": "logsnr"}
LOSSES = ("simple",)

# diffusers' scheduler config fields (DDPMScheduler's defaults) and their ddpm_fast names.
DDPM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
}
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# The *_log variants are the same variances, computed through a log in diffusers. None: the solvers' schedulers
# (DPM-Solver++, UniPC) have no variance of their own; a model trained with them uses the fixed_small posterior.
DIFFUSERS_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                       "fixed_large_log": "fixed_large", "learned_range": "learned_range", None: "fixed_small"}


@dataclass
class DiffusionConfig:
    """How a model was trained: everything ``ddpm_fast.sample`` needs besides the network itself.

    schedule: "linear" | "cosine" | "sigmoid" | "scaled_linear" | "custom" (then ``betas`` holds them)
    image_shape: (C, H, W) of the data the model was trained on.
    loss: "simple" = MSE on the prediction target (x min-SNR-gamma weights when ``min_snr_gamma`` is set),
          plus improved-diffusion's VLB term when ``variance == "learned_range"``.
    cosine_s, max_beta: parameters of the cosine schedule.
    """
    schedule: str = "linear"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: Optional[Tuple[float, ...]] = None
    prediction: str = "eps"
    variance: str = "fixed_small"
    clip: bool = True
    image_shape: Tuple[int, int, int] = (3, 32, 32)
    loss: str = "simple"
    min_snr_gamma: Optional[float] = None
    extra: dict = field(default_factory=dict)
    cosine_s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("variance", self.variance, VARIANCES)
        check_choice("loss", self.loss, LOSSES)
        if isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"T must be an int >= 1, got {self.T!r}")
        if (self.schedule == "custom") != (self.betas is not None):
            raise ValueError("betas must be given exactly when schedule == 'custom'")
        if self.betas is not None and len(self.betas) != self.T:
            raise ValueError(f"custom betas has {len(self.betas)} entries but T = {self.T}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")

    def make_schedule(self) -> NoiseSchedule:
        """The training NoiseSchedule this config describes (respace it for sampling)."""
        if self.schedule == "custom":
            return NoiseSchedule(betas=self.betas)
        if self.schedule == "cosine":
            return NoiseSchedule.cosine(self.T, s=self.cosine_s, max_beta=self.max_beta)
        return getattr(NoiseSchedule, self.schedule)(self.T, beta_start=self.beta_start, beta_end=self.beta_end)

    def to_dict(self) -> dict:
        """JSON-serialisable (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        d["betas"] = None if self.betas is None else list(self.betas)
        return d

    @classmethod
    def from_diffusers(cls, scheduler, image_shape=(3, 32, 32)) -> "DiffusionConfig":
        """DiffusionConfig of a diffusers scheduler (DDPMScheduler, DDIMScheduler, the solvers' schedulers
        DPMSolverMultistepScheduler / UniPCMultistepScheduler / ...), its ``.config``, or a config dict (a parsed
        scheduler_config.json). Taken: the schedule (beta_schedule, beta_start, beta_end, num_train_timesteps,
        trained_betas), prediction_type, variance_type (None -> fixed_small), clip_sample (schedulers without one --
        the solvers' -- do not clip). Settings that only steer inference (timestep_spacing, steps_offset, solver_order,
        ...) go to ``extra["diffusers"]`` with the class name. Refused, with the field named: thresholding,
        rescale_betas_zero_snr, clip_sample_range != 1. image_shape: (C, H, W) of the model's images."""
        return diffusion_config_from_diffusers(scheduler, image_shape)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _pick(c, field, table):
    if c[field] not in table:
        raise ValueError(f"unsupported diffusers scheduler config: {field}={c[field]!r} (ddpm_fast supports "
                         f"{sorted(table, key=str)})")
    return table[c[field]]


def diffusion_config_from_diffusers(scheduler, image_shape=(3, 32, 32)) -> DiffusionConfig:
    """``DiffusionConfig.from_diffusers`` (see there)."""
    given, class_name = diffusers_config(scheduler)
    clips = "clip_sample" in given or class_name in (None, "DDPMScheduler", "DDIMScheduler")
    c = {**DDPM_SCHEDULER_DEFAULTS, **given}
    for field, ok in (("thresholding", False), ("rescale_betas_zero_snr", False), ("clip_sample_range", 1.0)):
        if c[field] != ok:
            raise ValueError(f"unsupported diffusers scheduler config: {field}={c[field]!r} (ddpm_fast supports "
                             f"{ok!r})")
    betas = c["trained_betas"]
    schedule = "custom" if betas is not None else _pick(c, "beta_schedule", DIFFUSERS_SCHEDULES)
    extra = {k: v for k, v in given.items() if k not in DDPM_SCHEDULER_DEFAULTS}
    if class_name:
        extra["diffusers_class"] = class_name
    try:
        return DiffusionConfig(
            schedule=schedule, T=len(betas) if betas is not None else int(c["num_train_timesteps"]),
            beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
            betas=None if betas is None else tuple(float(b) for b in betas),
            prediction=_pick(c, "prediction_type", DIFFUSERS_PREDICTIONS),
            variance=_pick(c, "variance_type", DIFFUSERS_VARIANCES), clip=bool(c["clip_sample"]) and clips,
            image_shape=tuple(image_shape), extra={"diffusers": extra} if extra else {})
    except ValueError as err:
        raise ValueError(f"diffusers scheduler config is not a valid DiffusionConfig: {err}") from None


def diffusers_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """A DDPMScheduler config for ``diffusion`` (``DDPMScheduler.from_config(...)``)."""
    inverse = {v: k for k, v in DIFFUSERS_SCHEDULES.items()}
    if diffusion.schedule not in inverse and diffusion.schedule != "custom":
        raise ValueError(f"DiffusionConfig.schedule={diffusion.schedule!r} has no diffusers equivalent")
    if diffusion.schedule == "cosine" and (diffusion.cosine_s, diffusion.max_beta) != (0.008, 0.999):
        raise ValueError("diffusers' squaredcos_cap_v2 fixes cosine_s=0.008 and max_beta=0.999; got "
                         f"cosine_s={diffusion.cosine_s}, max_beta={diffusion.max_beta}")
    return dict(
        num_train_timesteps=diffusion.T, beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
        beta_schedule=inverse.get(diffusion.schedule, "linear"),
        trained_betas=None if diffusion.betas is None else list(diffusion.betas),
        variance_type=diffusion.variance, clip_sample=diffusion.clip,
        prediction_type={v: k for k, v in DIFFUSERS_PREDICTIONS.items()}[diffusion.prediction])


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
