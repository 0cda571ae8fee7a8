"""DiffusionConfig: how a model was trained (schedule, prediction, variance, clip, loss), and the option names
(predictions, variances, samplers, schedules) that every sampler and op accepts."""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .schedule import NoiseSchedule
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
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
