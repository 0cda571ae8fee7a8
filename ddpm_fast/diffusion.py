"""The reference diffusion math in plain PyTorch: the specification every fused op is tested against."""
from dataclasses import dataclass, field
from typing import Optional, Tuple

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


@dataclass
class DiffusionConfig:
    """How a model was trained: everything ``ddpm_fast.sample`` needs besides the network itself.

    schedule: "linear" | "cosine" | "sigmoid" | "scaled_linear" | "custom" (then ``betas`` holds them)
    image_shape: (C, H, W) of the data the model was trained on.
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
