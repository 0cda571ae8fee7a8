"""UNetConfig (the U-Net's architecture as a dataclass) and the named presets with their training defaults."""
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

from ..diffusion import DiffusionConfig


@dataclass
class UNetConfig:
    """Architecture of the U-Net (weights do not depend on ``fused``, a runtime choice).

    Level ``l`` (0 .. len(ch_mult)-1) works at resolution image_size / 2**l with ch * ch_mult[l] channels.
    attn_resolutions: resolutions (e.g. 16 for 16x16) whose levels get self-attention after each ResBlock.
    attn_head_dim: channels per attention head; None = one head spanning all channels (DDPM).
    time_embed_dim: width of the timestep MLP; None = 4 * ch.
    downsample_padding: 1 = conv3x3/2 with padding 1; 0 = pad right/bottom by 1, then conv3x3/2 unpadded (the
        TF "SAME" padding of the DDPM release, diffusers' downsample_padding=0).
    num_classes: K for a class-conditional U-Net (None: unconditional). It learns K + 1 class embeddings
        (diffusers' ``num_class_embeds=K+1``): labels 0..K-1 are the classes, label K (``null_label``) is
        "no class", which classifier-free guidance samples as the unconditional model.
    """
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    mid_attention: bool = True
    attn_head_dim: Optional[int] = None
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6
    time_embed_dim: Optional[int] = None
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    num_classes: Optional[int] = None
    fused: bool = True

    def __post_init__(self):
        # Configs read back from JSON carry lists; keep tuples so configs compare and hash alike.
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        self._validate()

    @property
    def channels(self) -> Tuple[int, ...]:
        """Channels of each level: ch * ch_mult[l]."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def attn_levels(self) -> Tuple[int, ...]:
        """Indices of the levels that have self-attention."""
        return tuple(l for l in range(len(self.ch_mult)) if self.image_size >> l in self.attn_resolutions)

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.ch

    @property
    def null_label(self) -> Optional[int]:
        """The label meaning "no class" (= num_classes), or None for an unconditional U-Net."""
        return self.num_classes

    def _validate(self):
        def bad(field, value, why):
            raise ValueError(f"UNetConfig.{field}={value!r}: {why}")

        for name in ("image_size", "in_channels", "out_channels", "ch", "num_res_blocks", "num_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be a positive int")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            bad("ch_mult", self.ch_mult, "must be a non-empty tuple of positive ints")
        for c in self.channels:
            if c % self.num_groups:
                bad("num_groups", self.num_groups, f"{c} channels (ch * ch_mult) are not divisible into "
                    f"{self.num_groups} groups")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            bad("image_size", self.image_size, f"must be divisible by 2**(levels-1) = {factor} "
                f"({len(self.ch_mult)} levels from ch_mult={self.ch_mult})")
        present = [self.image_size >> l for l in range(len(self.ch_mult))]
        for r in self.attn_resolutions:
            if r not in present:
                bad("attn_resolutions", self.attn_resolutions, f"resolution {r} is not present; the levels "
                    f"work at {present}")
        self._validate_heads()
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "must be in [0, 1)")
        if not self.norm_eps > 0:
            bad("norm_eps", self.norm_eps, "must be > 0")
        if self.downsample_padding not in (0, 1):
            bad("downsample_padding", self.downsample_padding, "must be 0 (asymmetric, as diffusers) or 1")
        if self.time_embed_dim is not None and self.time_embed_dim < 1:
            bad("time_embed_dim", self.time_embed_dim, "must be a positive int or None (= 4 * ch)")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or
                                             isinstance(self.num_classes, bool) or self.num_classes < 1):
            bad("num_classes", self.num_classes, "must be a positive int (the number of classes) or None")
        if self.temb_dim < 1 or self.ch < 2:
            bad("ch", self.ch, "the sinusoidal timestep embedding needs ch >= 2")

    def _validate_heads(self):
        if self.attn_head_dim is None:
            return
        attn_channels = [self.channels[l] for l in self.attn_levels]
        attn_channels += [self.channels[-1]] if self.mid_attention else []
        for c in attn_channels:
            if self.attn_head_dim < 1 or c % self.attn_head_dim:
                raise ValueError(f"UNetConfig.attn_head_dim={self.attn_head_dim!r}: an attention block has {c} "
                                 f"channels, not divisible into heads of {self.attn_head_dim}")

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists); ``UNetConfig.from_dict`` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"UNetConfig has no field(s) {unknown}")
        return cls(**d)


PRESETS = {
    # The paper's CIFAR-10 model (35.75 M parameters; diffusers' google/ddpm-cifar10-32 has this config).
    "ddpm_cifar10": dict(image_size=32, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_groups=32),
    # 8x8 or 28x28 grayscale: small enough to train on a 2-core CPU; attention only at the lowest resolution.
    # 0.69 M parameters; 2.3 GFLOP per training step (forward + backward) at batch 64 on 8x8.
    "tiny": dict(image_size=8, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                 attn_resolutions=None, dropout=0.1, num_groups=8),
}


def preset_config(name: str, **overrides) -> Tuple[UNetConfig, DiffusionConfig]:
    """The UNetConfig of a preset with ``overrides`` applied, and its default DiffusionConfig.

    The DDPM paper's recipe: linear betas 1e-4..0.02, T=1000, eps prediction, fixed_large variance (learned_range
    when out_channels is 2 * in_channels). Changing in_channels alone also changes out_channels; a preset whose
    attn_resolutions is None puts attention at the lowest resolution of the final image_size.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(UNetConfig)})
    if unknown:
        raise ValueError(f"UNet.preset({name!r}): unknown override(s) {unknown}; UNetConfig fields are "
                         f"{[f.name for f in fields(UNetConfig)]}")
    cfg = {**PRESETS[name], **overrides}
    if "in_channels" in overrides and "out_channels" not in overrides:
        cfg["out_channels"] = overrides["in_channels"]
    if cfg["attn_resolutions"] is None:
        cfg["attn_resolutions"] = (cfg["image_size"] >> (len(cfg["ch_mult"]) - 1),)
    config = UNetConfig(**cfg)
    learned = config.out_channels == 2 * config.in_channels
    diffusion = DiffusionConfig(schedule="linear", T=1000, beta_start=1e-4, beta_end=0.02, prediction="eps",
                                variance="learned_range" if learned else "fixed_large", clip=True,
                                image_shape=(config.in_channels, config.image_size, config.image_size))
    return config, diffusion
