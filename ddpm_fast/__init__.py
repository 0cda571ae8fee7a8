"""ddpm_fast: fast, correct DDPM training and sampling for PyTorch.

Public API (imported lazily, so ``import ddpm_fast`` stays cheap):
    sample, train, UNet, UNetConfig, NoiseSchedule, DiffusionConfig, TrainConfig, load, save,
    GroupNormSiLU, group_norm_silu
"""
import importlib

__version__ = "0.1.0"

_API = {
    "sample": "ddpm_fast.sampler",
    "train": "ddpm_fast.train",
    "TrainConfig": "ddpm_fast.train",
    "UNet": "ddpm_fast.unet",
    "UNetConfig": "ddpm_fast.unet",
    "NoiseSchedule": "ddpm_fast.schedule",
    "DiffusionConfig": "ddpm_fast.diffusion",
    "load": "ddpm_fast.checkpoint",
    "save": "ddpm_fast.checkpoint",
    "GroupNormSiLU": "ddpm_fast.ops.group_norm_silu",
    "group_norm_silu": "ddpm_fast.ops.group_norm_silu",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")


def __dir__():
    return __all__
