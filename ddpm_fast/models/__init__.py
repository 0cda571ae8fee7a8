"""The DDPM U-Net (``UNet``, ``UNetConfig``, presets) on the fused GroupNorm+SiLU op, and its conversion to and
from diffusers' UNet2DModel (``models.diffusers``)."""
from .config import PRESETS, UNetConfig, preset_config
from .unet import UNet

__all__ = ["PRESETS", "UNet", "UNetConfig", "preset_config"]
