"""The DDPM U-Net (Ho et al. 2020), numerically the same network as diffusers' UNet2DModel of the DDPM family.

Parameter names are diffusers' own (``down_blocks.1.attentions.0.to_q.weight``, ...), so one state_dict loads
into ddpm_fast and diffusers alike (older diffusers files need a rename of their attention keys: see
models/diffusers.py). ``fused=True`` runs every GroupNorm that is followed by SiLU as the fused op; the attention's
GroupNorm (not followed by SiLU) is nn.GroupNorm in both modes.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import DiffusionConfig
from ..ops.group_norm_silu import GroupNormSiLU
from .config import UNetConfig, preset_config
from .diffusers import load_state, read_diffusers_checkpoint, read_diffusers_model, to_diffusers


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of timesteps. t: (N,) int or float; returns (N, dim) fp32.

    Frequencies exp(-ln(10000) * i / (dim/2 - freq_shift)); [sin, cos] halves, or [cos, sin] when flipped.
    Computed per call rather than kept as a buffer, so model.half()/.to(bf16) cannot round the frequencies.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0))
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else
                    [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _GroupNormThenSiLU(nn.GroupNorm):
    """The unfused baseline: nn.GroupNorm's kernel, then SiLU as a separate op (nn.GroupNorm's state_dict)."""

    def forward(self, x):
        return F.silu(super().forward(x))


def _norm_act(channels: int, config: UNetConfig) -> nn.GroupNorm:
    """GroupNorm followed by SiLU: the fused op or the plain pair, with identical parameters."""
    cls = GroupNormSiLU if config.fused else _GroupNormThenSiLU
    return cls(config.num_groups, channels, eps=config.norm_eps)


def _same_format(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """y in like's memory format, so one layout runs end to end (a flip makes convs re-pack their weights)."""
    cl = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, in place into ``fresh`` (a conv output: a conv's backward does not need it) when that
    keeps the out-of-place result's dtype; under autocast a bf16 conv output plus an fp32 residual must still
    promote to fp32, as in diffusers. Same values either way (float addition is commutative)."""
    if torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype:
        return fresh.add_(other)
    return fresh + other


class ResnetBlock(nn.Module):
    """GN+SiLU -> conv3x3 -> + Linear(SiLU(temb)) -> GN+SiLU -> dropout -> conv3x3, plus the (1x1) skip.

    x: (N, in_ch, H, W); proj: (N or 1, out_ch), this block's ``time_emb_proj(SiLU(temb))``, which depends on t
    alone: UNet.time_projections computes every block's at once (and sampling, once for all steps).
    Returns (N, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, config: UNetConfig):
        super().__init__()
        self.norm1 = _norm_act(in_ch, config)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(config.temb_dim, out_ch)
        self.norm2 = _norm_act(out_ch, config)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, proj):
        h = _add_into(self.conv1(self.norm1(x)), proj[:, :, None, None])
        h = self.norm2(h)
        if self.training and self.dropout.p > 0:  # skip the module call in eval: ~30 per forward add up
            h = self.dropout(h)
        h = self.conv2(h)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return _add_into(h, skip)


class AttentionBlock(nn.Module):
    """x + out(attention(q, k, v)) over the H*W positions of GroupNorm(x); heads of ``head_dim`` channels.

    x: (N, C, H, W) -> same shape and memory format. With channels_last x the (N, HW, C) token view is free.
    """

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.heads = channels // (config.attn_head_dim or channels)
        self.group_norm = nn.GroupNorm(config.num_groups, channels, eps=config.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels))  # key "to_out.0", as diffusers' Attention

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)

        def split_heads(y):  # (N, HW, C) -> (N, heads, HW, C // heads)
            return y.view(n, h * w, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = (split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out(out.transpose(1, 2).reshape(n, h * w, c))
        out = out.transpose(1, 2).view(n, c, h, w)  # a channels_last view of the (N, HW, C) result
        return x + _same_format(out, x)


class Downsample(nn.Module):
    """conv3x3 with stride 2: (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # right and bottom only, as TF's "SAME" at stride 2
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2, then conv3x3: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One level of the encoder: ResBlocks (each followed by attention at attention levels), then Downsample.

    Pushes every ResBlock/attention output and the downsampled output onto ``skips``.
    """

    def __init__(self, in_ch, out_ch, attention: bool, downsample: bool, config: UNetConfig):
        super().__init__()
        n = config.num_res_blocks
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, config) for i in range(n))
        self.attentions = nn.ModuleList(AttentionBlock(out_ch, config) for _ in range(n) if attention)
        self.downsamplers = nn.ModuleList([Downsample(out_ch, config.downsample_padding)] if downsample else [])

    def forward(self, h, projs, skips):
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, next(projs))
            if self.attentions:
                h = self.attentions[i](h)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    """One level of the decoder: ResBlocks on concat([h, skip]) (attention after each at attention levels),
    then Upsample. ``skip_chs`` lists the channels of the skips it pops, in pop order."""

    def __init__(self, in_ch, out_ch, skip_chs, attention: bool, upsample: bool, config: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock((in_ch if i == 0 else out_ch) + s, out_ch, config)
                                     for i, s in enumerate(skip_chs))
        self.attentions = nn.ModuleList(AttentionBlock(out_ch, config) for _ in skip_chs if attention)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, h, projs, skips):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), next(projs))
            if self.attentions:
                h = self.attentions[i](h)
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(nn.Module):
    """ResBlock -> attention (unless mid_attention=False) -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, config) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, config)] if config.mid_attention else [])

    def forward(self, h, projs):
        h = self.resnets[0](h, next(projs))
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h, next(projs))


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding: (N, ch) -> (N, temb_dim)."""

    def __init__(self, ch: int, temb_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(ch, temb_dim)
        self.linear_2 = nn.Linear(temb_dim, temb_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet(nn.Module):
    """The DDPM U-Net: ``model(x, t)`` predicts eps (or x0 / v, and variance when out_channels = 2 * in_channels).

    x: (N, in_channels, H, W) with H, W divisible by 2**(levels-1), any float dtype the weights have (or under
    autocast), contiguous or channels_last (the output keeps x's memory format).
    t: (N,) int64 ORIGINAL training timesteps 0..T-1 (floats allowed); a Python number or 0-dim tensor is
    broadcast over the batch. Returns (N, out_channels, H, W).

    ``config`` is the architecture; ``diffusion`` the settings it was trained with (None when unknown), which
    ``ddpm_fast.sample(model, n, steps)`` reads.
    """

    def __init__(self, config: UNetConfig, diffusion: Optional[DiffusionConfig] = None):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet(config): expected a UNetConfig, got {type(config).__name__}")
        _check_diffusion(config, diffusion)
        self.config = config
        self.diffusion = diffusion
        chs, levels = config.channels, len(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.time_embedding = TimestepEmbedding(config.ch, config.temb_dim)
        # diffusers' class_embed_type=None: one learned row per label (K classes + the null label K)
        self.class_embedding = None if config.num_classes is None else \
            nn.Embedding(config.num_classes + 1, config.temb_dim)

        skip_chs, in_ch = [config.ch], config.ch  # channels of the skips, in push order
        self.down_blocks = nn.ModuleList()
        for l in range(levels):
            last = l == levels - 1
            self.down_blocks.append(DownBlock(in_ch, chs[l], l in config.attn_levels, not last, config))
            skip_chs += [chs[l]] * (config.num_res_blocks + (0 if last else 1))
            in_ch = chs[l]
        self.mid_block = MidBlock(chs[-1], config)
        self.up_blocks = nn.ModuleList()
        for l in reversed(range(levels)):
            pops = [skip_chs.pop() for _ in range(config.num_res_blocks + 1)]
            self.up_blocks.append(UpBlock(in_ch, chs[l], pops, l in config.attn_levels, l > 0, config))
            in_ch = chs[l]
        self.conv_norm_out = _norm_act(chs[0], config)
        self.conv_out = nn.Conv2d(chs[0], config.out_channels, 3, padding=1)
        self._proj_sizes = tuple(block.time_emb_proj.out_features for block in self._resnets())

    @classmethod
    def preset(cls, name: str, diffusion: Optional[DiffusionConfig] = None, **overrides) -> "UNet":
        """A preset ("ddpm_cifar10", "tiny") with UNetConfig ``overrides`` and its default DiffusionConfig
        (or ``diffusion``). E.g. ``UNet.preset("tiny", image_size=28, fused=False)``."""
        config, default = preset_config(name, **overrides)
        return cls(config, default if diffusion is None else diffusion)

    @classmethod
    def from_diffusers(cls, model, scheduler_config=None, fused: bool = True) -> "UNet":
        """Converts a diffusers UNet2DModel (DDPM family), keeping its device, dtype and mode;
        ``scheduler_config`` (a dict or a scheduler) gives ``diffusion``. See ddpm_fast.models.diffusers."""
        config, diffusion, state_dict, source = read_diffusers_model(model, scheduler_config, fused)
        unet = cls(config, diffusion)
        load_state(unet, state_dict, source)
        param = next(model.parameters())
        return unet.to(device=param.device, dtype=param.dtype).train(model.training)

    @classmethod
    def from_diffusers_checkpoint(cls, directory, fused: bool = True) -> "UNet":
        """Loads a UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors/.bin), or a pipeline
        directory with unet/ and scheduler/, without diffusers installed. Returns the model in eval mode."""
        config, diffusion, state_dict, source = read_diffusers_checkpoint(directory, fused)
        unet = cls(config, diffusion)
        load_state(unet, state_dict, source)
        return unet.eval()

    def to_diffusers(self):
        """The same network as a diffusers UNet2DModel with the same weights (needs diffusers installed)."""
        return to_diffusers(self)

    def forward(self, x: torch.Tensor, t, y=None, time_proj: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y: class labels of a conditional U-Net (``num_classes`` = K): an (N,) int tensor on x's device with
        values 0..K (K = ``null_label``, no class), or an int for the whole batch; None = the null label.
        Unconditional U-Nets take no y. ``time_proj``: optional ``self.time_projections(t, y)`` computed
        beforehand ((N or 1, P)); t is then ignored (and y must be None). The sampler passes it: every sample
        of a reverse step shares t, so it computes the projections of all steps in one batched pass before the
        loop instead of ~30 small matmuls in every forward."""
        if time_proj is None:
            t = self._check_inputs(x, t)
            time_proj = self._time_projections(t, self._check_y(y, x.shape[0], x.device))
        else:
            self._check_x(x)
            if y is not None:
                raise ValueError("UNet: pass y to time_projections(t, y), not beside a precomputed time_proj")
            if time_proj.dim() != 2 or time_proj.shape[0] not in (1, x.shape[0]) or \
                    time_proj.shape[1] != sum(self._proj_sizes):
                raise ValueError(f"UNet: time_proj must be (N or 1, {sum(self._proj_sizes)}) from "
                                 f"time_projections(t), got {tuple(time_proj.shape)}")
        projs = iter(time_proj.split(self._proj_sizes, dim=1))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, projs, skips)
        h = self.mid_block(h, projs)
        for block in self.up_blocks:
            h = block(h, projs, skips)
        return self.conv_out(self.conv_norm_out(h))

    @property
    def null_label(self) -> Optional[int]:
        """The label meaning "no class" (= config.num_classes); None for an unconditional U-Net."""
        return self.config.null_label

    def time_projections(self, t: torch.Tensor, y=None) -> torch.Tensor:
        """Everything the network computes from t (and y) alone: each ResBlock's ``time_emb_proj(SiLU(emb))``,
        concatenated in forward order, with emb = time_embeddings(t) + class_embeddings(y) (the class term only
        for a conditional U-Net; y = None is the null label). t: (N,) timesteps; y: (N,) labels, an int, or
        None -> (N, P), P = the sum of the blocks' out channels.

        Precomputing for a sampler. Without labels (an unconditional U-Net, or the null label) the projections
        depend on t alone: one (steps, P) table per chain, one row per step. With labels SiLU does not split over
        the sum, so they depend on (t, y) jointly; the split is at emb: ``time_embeddings`` of every step and
        ``class_embeddings`` of the chain's labels once per chain ((steps, E) and (B, E), E = temb_dim), then per
        step ``projections(emb_t[i] + emb_y, weights)`` with ``weights = projection_weights()`` taken once per
        chain: one add, one SiLU and ONE (B, E) x (E, P) matmul, for any number of classes. A table of every
        (step, label) pair would make the per-step part a gather, but holds steps * (K + 1) * P values (210 MiB
        for K = 10 with the CIFAR-10 U-Net's P = 4992 at 1000 steps; 20 GB at K = 1000) and takes 0.4-1.5 U-Net
        forwards per chain to build; the split spends 0.10-0.26% of a forward per step, 1-2.6 forwards over a
        1000-step chain (measured on the CPU by benchmarks/bench_class_conditioning.py; the blocks' separate
        matmuls take 0.2-1.4% per step, time_projections in every step 0.2-2.3%). Either costs ~0.1-0.3% of
        the chain; the split needs no memory that grows with K or steps, so it is the design.
        """
        if not torch.is_tensor(t) or t.dim() != 1:
            raise ValueError(f"UNet.time_projections: t must be an (N,) tensor, got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        return self._time_projections(t, self._check_y(y, t.shape[0], t.device))

    def _time_projections(self, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """time_projections of checked inputs (y None or a checked (N,) tensor)."""
        emb = self.time_embeddings(t)
        if self.class_embedding is not None:
            emb = emb + (self.class_embedding.weight[self.null_label] if y is None else self.class_embedding(y))
        return self.projections(emb)

    def time_embeddings(self, t: torch.Tensor) -> torch.Tensor:
        """The part of the conditioning that depends on t alone: the timestep MLP's output. t: (N,) -> (N, E)."""
        emb = timestep_embedding(t, self.config.ch, self.config.flip_sin_to_cos, self.config.freq_shift)
        return self.time_embedding(emb.to(self.time_embedding.linear_1.weight.dtype))

    def class_embeddings(self, y) -> torch.Tensor:
        """The class part of a conditional U-Net's embedding: y (N,) labels 0..K (checked) -> (N, E), the rows
        diffusers adds to its time embedding (``class_embedding(y)``). Labels K mean no class."""
        if self.class_embedding is None:
            raise _unconditional()
        if not torch.is_tensor(y) or y.dim() != 1:
            raise ValueError(f"UNet.class_embeddings: y must be an (N,) tensor of labels, got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
        return self.class_embedding(self._check_y(y, y.shape[0], y.device))

    def projections(self, emb: torch.Tensor, weights=None) -> torch.Tensor:
        """Each ResBlock's ``time_emb_proj(SiLU(emb))``, concatenated in forward order: (N, E) -> (N, P).
        ``weights``: ``projection_weights()`` computed beforehand, to run all blocks as ONE matmul (same math;
        rounding may differ in the last place); without it each block's Linear runs (what training uses)."""
        act = F.silu(emb)  # every ResBlock applies SiLU before its projection: do it once
        if weights is not None:
            return F.linear(act, *weights)
        return torch.cat([block.time_emb_proj(act) for block in self._resnets()], dim=1)

    def projection_weights(self):
        """(weight (P, E), bias (P,)): every ResBlock's time_emb_proj stacked in forward order (copies; take
        them again after the weights change)."""
        blocks = self._resnets()
        weight = torch.cat([b.time_emb_proj.weight for b in blocks])
        return weight, torch.cat([b.time_emb_proj.bias for b in blocks])

    def _resnets(self):
        """The ResBlocks in forward order (module registration order: down, mid, up)."""
        return [m for m in self.modules() if isinstance(m, ResnetBlock)]

    def _check_inputs(self, x, t) -> torch.Tensor:
        """Validates shapes, dtypes and devices (metadata only: no device sync); returns t as an (N,) tensor."""
        self._check_x(x)
        return self._check_t(x, t)

    def _check_x(self, x):
        cfg = self.config
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"UNet: x must be (N, {cfg.in_channels}, H, W), got {got}")
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet: H and W must be divisible by {factor} ({len(cfg.ch_mult)} levels), "
                             f"got {tuple(x.shape[2:])}")
        if not x.is_floating_point():
            raise TypeError(f"UNet: x must be a float tensor, got {x.dtype}")

    def _check_t(self, x, t) -> torch.Tensor:
        n = x.shape[0]
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"UNet: t must be a tensor or a number, got {type(t).__name__}")
            return torch.full((n,), t, device=x.device, dtype=torch.int64 if isinstance(t, int) else torch.float32)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"UNet: t must hold integer (or float) timesteps, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"UNet: t is on {t.device} but x is on {x.device}")
        if t.dim() == 0 or tuple(t.shape) == (1,):
            return t.reshape(1).expand(n)
        if tuple(t.shape) != (n,):
            raise ValueError(f"UNet: t must be (N,) = ({n},), a 0-dim tensor or a number; got {tuple(t.shape)}")
        return t


    def _check_y(self, y, n: Optional[int], device) -> Optional[torch.Tensor]:
        """Checks class labels: None, an int, or an (N,) integer tensor on ``device`` with values 0..K.
        Returns None (the null label) or an (N,) int tensor. The range check reads the labels on the host
        (one device sync on CUDA); it is skipped while a CUDA graph is captured or torch.compile traces."""
        if y is None:
            return None
        k = self.config.num_classes
        if k is None:
            raise _unconditional()
        if not torch.is_tensor(y):
            if isinstance(y, bool) or not isinstance(y, int):
                raise TypeError(f"UNet: y must be an int tensor of class labels, an int or None; got "
                                f"{type(y).__name__}")
            if not 0 <= y <= k:
                raise ValueError(f"UNet: class label {y} is out of range: labels are 0..{k - 1}, or {k} for "
                                 f"no class")
            return torch.full((n,), y, dtype=torch.int64, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"UNet: y must hold integer class labels, got {y.dtype}")
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"UNet: y must be (N,) = ({n},) class labels, got {tuple(y.shape)}")
        if y.device != device:
            raise ValueError(f"UNet: y is on {y.device} but x is on {device}")
        if n and not _tracing():
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi > k:
                raise ValueError(f"UNet: class labels must be in 0..{k} (0..{k - 1} the classes, {k} no "
                                 f"class); got values in [{lo}, {hi}]")
        return y


def _unconditional() -> ValueError:
    return ValueError("UNet: this U-Net is unconditional (UNetConfig.num_classes=None); it takes no class labels y")


def _tracing() -> bool:
    """True while torch.compile traces or a CUDA graph is being captured (no host reads of device values)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_diffusion(config: UNetConfig, diffusion: Optional[DiffusionConfig]):
    """The diffusion settings must fit the network: image channels and size, and a variance output if learned."""
    if diffusion is None:
        return
    if not isinstance(diffusion, DiffusionConfig):
        raise TypeError(f"UNet(diffusion=): expected a DiffusionConfig or None, got {type(diffusion).__name__}")
    c, h, w = diffusion.image_shape
    if (c, h, w) != (config.in_channels, config.image_size, config.image_size):
        raise ValueError(f"DiffusionConfig.image_shape={tuple(diffusion.image_shape)} does not fit the U-Net "
                         f"(in_channels={config.in_channels}, image_size={config.image_size})")
    want = 2 * c if diffusion.variance == "learned_range" else c
    if config.out_channels != want:
        raise ValueError(f"UNetConfig.out_channels={config.out_channels}: DiffusionConfig.variance="
                         f"{diffusion.variance!r} needs out_channels={want} for {c} image channels")
