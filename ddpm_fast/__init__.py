"""ddpm_fast: fast, correct DDPM training and sampling for PyTorch.

Public API (imported lazily, so ``import ddpm_fast`` stays cheap):
    sample, sample_to_dir, train, UNet, UNetConfig, NoiseSchedule, DiffusionConfig, TrainConfig, load, save,
    GroupNormSiLU, group_norm_silu
The subpackages (docs/architecture.md): diffusion/ (schedules, reference math), ops/ (fused kernels), models/
(the U-Net), sampling/, training/, eval/ (metrics), bench/; plus data, checkpoint, images, files, distributed.
"""
import importlib

from . import _aliases
from ._version import __version__

_API = {
    "sample": "ddpm_fast.sampling",
    "sample_to_dir": "ddpm_fast.sampling",
    "train": "ddpm_fast.training",
    "TrainConfig": "ddpm_fast.training",
    "UNet": "ddpm_fast.models",
    "UNetConfig": "ddpm_fast.models",
    "NoiseSchedule": "ddpm_fast.diffusion",
    "DiffusionConfig": "ddpm_fast.diffusion",
    "load": "ddpm_fast.checkpoint",
    "save": "ddpm_fast.checkpoint",
    "GroupNormSiLU": "ddpm_fast.ops.group_norm_silu",
    "group_norm_silu": "ddpm_fast.ops.group_norm_silu",
}

__all__ = sorted(_API) + ["__version__"]
_aliases.install()


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    alias = _aliases.ALIASES.get(f"{__name__}.{name}")
    if alias is not None:  # an old module path used as an attribute: ddpm_fast.sampler.last_run_info()
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")


def __dir__():
    return __all__
