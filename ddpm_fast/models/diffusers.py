"""Conversion between ddpm_fast's UNet and diffusers' UNet2DModel (DDPM family) plus its scheduler config.

Both networks use the same parameter names, so the weights move unchanged; only diffusers files written before
2023 name the attention projections query/key/value/proj_attn, which ``convert_diffusers_state_dict`` renames.
A class-conditional UNet2DModel (class_embed_type None, ``num_class_embeds`` = M) is a U-Net with
num_classes = M - 1: its ``class_embedding.weight`` rows are labels 0..M-1, the last one the null label.
Reading a checkpoint directory needs safetensors or torch only; diffusers is needed for ``to_diffusers`` alone.
"""
import json
import re
from pathlib import Path
from typing import Mapping

import torch

from ..diffusion import DiffusionConfig
from .config import UNetConfig

# UNet2DModel.__init__ defaults (diffusers 0.42; tests compare them with the installed diffusers). A config.json
# omits fields that did not exist when it was written; diffusers then uses these defaults, and so must we.
DIFFUSERS_UNET2D_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# Fields whose other values select architectures ddpm_fast does not implement.
_FIXED = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"), "resnet_time_scale_shift": ("default",), "class_embed_type": (None,),
}
_DDPM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
}
_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear",
              "sigmoid": "sigmoid"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# The *_log variants are the same variances, computed through a log in diffusers.
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
# ddpm_fast's UNetConfig fields -> the diffusers field that sets them, for error messages.
_DIFFUSERS_NAME = {"image_size": "sample_size", "ch": "block_out_channels", "ch_mult": "block_out_channels",
                   "num_res_blocks": "layers_per_block", "attn_head_dim": "attention_head_dim",
                   "num_groups": "norm_num_groups", "time_embed_dim": "time_embedding_dim",
                   "attn_resolutions": "down_block_types"}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_OLD_ATTENTION_KEY = re.compile(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _unsupported(field, value, supported):
    return ValueError(f"unsupported diffusers UNet2DModel config: {field}={value!r} (ddpm_fast supports "
                      f"{supported})")


def _strip_res(name: str) -> str:
    return name[7:] if name.startswith("UNetRes") else name  # diffusers' get_*_block drops this prefix too


def _attention_levels(down_types, up_types):
    """Level indices with attention; the decoder must mirror the encoder (ddpm_fast's U-Net is symmetric)."""
    levels = len(down_types)
    down_attn = [_strip_res(b) == "AttnDownBlock2D" for b in down_types]
    for b in down_types:
        if _strip_res(b) not in ("DownBlock2D", "AttnDownBlock2D"):
            raise _unsupported("down_block_types", down_types, "DownBlock2D / AttnDownBlock2D")
    for b in up_types:
        if _strip_res(b) not in ("UpBlock2D", "AttnUpBlock2D"):
            raise _unsupported("up_block_types", up_types, "UpBlock2D / AttnUpBlock2D")
    if len(up_types) != levels:
        raise _unsupported("up_block_types", up_types, f"{levels} blocks, as down_block_types")
    up_attn = [_strip_res(b) == "AttnUpBlock2D" for b in reversed(up_types)]
    if up_attn != down_attn:
        raise _unsupported("up_block_types", up_types, f"attention at the same levels as down_block_types="
                           f"{down_types!r}")
    return [l for l in range(levels) if down_attn[l]]


def _square_size(size):
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int):
        return size[0]
    raise _unsupported("sample_size", size, "a square size (an int, or [S, S])")


def _num_classes(num_class_embeds):
    """UNetConfig.num_classes of diffusers' num_class_embeds: its LAST row is the null label, so M embeddings
    make M - 1 classes (a model trained without a null row keeps all M rows usable as labels 0..M-1)."""
    if num_class_embeds is None:
        return None
    if not isinstance(num_class_embeds, int) or isinstance(num_class_embeds, bool) or num_class_embeds < 2:
        raise _unsupported("num_class_embeds", num_class_embeds, "None or an int >= 2 (K classes + the null "
                           "label)")
    return num_class_embeds - 1


def unet_config_from_diffusers(config: Mapping, fused: bool = True) -> UNetConfig:
    """UNetConfig of a UNet2DModel config (``model.config`` or a parsed config.json); raises ValueError naming
    the field and value of anything ddpm_fast does not implement."""
    given = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    unknown = sorted(set(given) - set(DIFFUSERS_UNET2D_DEFAULTS))
    if unknown:
        raise ValueError(f"unsupported diffusers UNet2DModel config field(s) "
                         f"{ {k: given[k] for k in unknown} }: not part of the DDPM U-Net ddpm_fast implements")
    c = {**DIFFUSERS_UNET2D_DEFAULTS, **given}
    for field, supported in _FIXED.items():
        if c[field] not in supported or isinstance(c[field], bool) != isinstance(supported[0], bool):
            raise _unsupported(field, c[field], supported)
    head_dim = c["attention_head_dim"]
    if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool)):
        raise _unsupported("attention_head_dim", head_dim, "None or an int")
    if c["norm_num_groups"] is None:
        raise _unsupported("norm_num_groups", None, "an int")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise _unsupported("attn_norm_num_groups", c["attn_norm_num_groups"], "None or norm_num_groups")
    boc = tuple(c["block_out_channels"])
    if len(boc) != len(c["down_block_types"]):
        raise _unsupported("block_out_channels", c["block_out_channels"],
                           f"one entry per down block ({len(c['down_block_types'])})")
    if not boc or any(b % boc[0] for b in boc):
        raise _unsupported("block_out_channels", c["block_out_channels"], "multiples of the first entry")
    if c["sample_size"] is None:
        raise _unsupported("sample_size", None, "an int (attention levels are placed by resolution)")
    size = _square_size(c["sample_size"])
    num_classes = _num_classes(c["num_class_embeds"])
    attn_levels = _attention_levels(c["down_block_types"], c["up_block_types"])
    try:
        return UNetConfig(
            image_size=size, in_channels=c["in_channels"], out_channels=c["out_channels"], ch=boc[0],
            ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c["layers_per_block"],
            attn_resolutions=tuple(size >> l for l in attn_levels), mid_attention=bool(c["add_attention"]),
            attn_head_dim=c["attention_head_dim"], dropout=float(c["dropout"]), num_groups=c["norm_num_groups"],
            norm_eps=float(c["norm_eps"]), time_embed_dim=c["time_embedding_dim"],
            flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
            downsample_padding=c["downsample_padding"], num_classes=num_classes, fused=fused)
    except ValueError as err:
        ours = re.match(r"UNetConfig\.(\w+)=", str(err))
        field = _DIFFUSERS_NAME.get(ours[1], ours[1]) if ours else "?"
        raise ValueError(f"diffusers UNet2DModel config field {field}={c.get(field)!r} does not make a valid "
                         f"ddpm_fast U-Net: {err}") from None


def diffusers_config_from_unet(config: UNetConfig) -> dict:
    """Keyword arguments of the UNet2DModel that is the same network as ``config``."""
    levels = range(len(config.ch_mult))
    attn = set(config.attn_levels)
    return dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.out_channels,
        time_embedding_type="positional", time_embedding_dim=config.time_embed_dim,
        freq_shift=config.freq_shift, flip_sin_to_cos=config.flip_sin_to_cos,
        down_block_types=tuple("AttnDownBlock2D" if l in attn else "DownBlock2D" for l in levels),
        up_block_types=tuple("AttnUpBlock2D" if l in attn else "UpBlock2D" for l in reversed(levels)),
        block_out_channels=config.channels, layers_per_block=config.num_res_blocks, mid_block_scale_factor=1,
        downsample_padding=config.downsample_padding, dropout=config.dropout, act_fn="silu",
        attention_head_dim=config.attn_head_dim, norm_num_groups=config.num_groups, norm_eps=config.norm_eps,
        resnet_time_scale_shift="default", add_attention=config.mid_attention, class_embed_type=None,
        num_class_embeds=None if config.num_classes is None else config.num_classes + 1)


def diffusion_config_from_diffusers(scheduler_config, image_shape) -> DiffusionConfig:
    """DiffusionConfig of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ...) config; ``image_shape`` is
    (C, H, W). Settings that only steer inference (timestep_spacing, steps_offset, ...) go to ``extra``."""
    cfg = getattr(scheduler_config, "config", scheduler_config)
    given = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    c = {**_DDPM_SCHEDULER_DEFAULTS, **given}

    def pick(field, table):
        if c[field] not in table:
            raise ValueError(f"unsupported diffusers scheduler config: {field}={c[field]!r} (ddpm_fast supports "
                             f"{sorted(table)})")
        return table[c[field]]

    for field, ok in (("thresholding", False), ("rescale_betas_zero_snr", False), ("clip_sample_range", 1.0)):
        if c[field] != ok:
            raise ValueError(f"unsupported diffusers scheduler config: {field}={c[field]!r} (ddpm_fast supports "
                             f"{ok!r})")
    betas = c["trained_betas"]
    schedule = "custom" if betas is not None else pick("beta_schedule", _SCHEDULES)
    used = set(_DDPM_SCHEDULER_DEFAULTS)
    extra = {k: v for k, v in given.items() if k not in used}
    if "_class_name" in cfg:
        extra["diffusers_class"] = cfg["_class_name"]
    try:
        return DiffusionConfig(
            schedule=schedule, T=len(betas) if betas is not None else int(c["num_train_timesteps"]),
            beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
            betas=None if betas is None else tuple(float(b) for b in betas),
            prediction=pick("prediction_type", _PREDICTIONS), variance=pick("variance_type", _VARIANCES),
            clip=bool(c["clip_sample"]), image_shape=tuple(image_shape), extra={"diffusers": extra} if extra else {})
    except ValueError as err:
        raise ValueError(f"diffusers scheduler config is not a valid DiffusionConfig: {err}") from None


def diffusers_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """A DDPMScheduler config for ``diffusion`` (``DDPMScheduler.from_config(...)``)."""
    inverse = {v: k for k, v in _SCHEDULES.items()}
    if diffusion.schedule not in inverse and diffusion.schedule != "custom":
        raise ValueError(f"DiffusionConfig.schedule={diffusion.schedule!r} has no diffusers equivalent")
    if diffusion.schedule == "cosine" and (diffusion.cosine_s, diffusion.max_beta) != (0.008, 0.999):
        raise ValueError("diffusers' squaredcos_cap_v2 fixes cosine_s=0.008 and max_beta=0.999; got "
                         f"cosine_s={diffusion.cosine_s}, max_beta={diffusion.max_beta}")
    return dict(
        num_train_timesteps=diffusion.T, beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
        beta_schedule=inverse.get(diffusion.schedule, "linear"),
        trained_betas=None if diffusion.betas is None else list(diffusion.betas),
        variance_type=diffusion.variance,
        clip_sample=diffusion.clip,
        prediction_type={v: k for k, v in _PREDICTIONS.items()}[diffusion.prediction])


def convert_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A diffusers UNet2DModel state_dict with ddpm_fast's keys: the same keys, except that pre-2023 files'
    attention names (query, key, value, proj_attn) become to_q, to_k, to_v, to_out.0."""
    out = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_KEY.match(key)
        out[f"{m[1]}{_NEW_ATTENTION_NAME[m[2]]}.{m[3]}" if m else key] = value
    return out


def load_state(unet, state_dict, source: str):
    """Strict load; first an error naming the source and the first mismatching keys or shapes."""
    state_dict = convert_diffusers_state_dict(state_dict)
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{what} {items[:4]}{' ...' if len(items) > 4 else ''}" for what, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)) if items]
    if problems:
        raise ValueError(f"weights of {source} do not fit the U-Net its config describes: {'; '.join(problems)}")
    unet.load_state_dict(state_dict)


def read_diffusers_model(model, scheduler_config=None, fused: bool = True):
    """(UNetConfig, DiffusionConfig or None, state_dict, source name) of a diffusers ``UNet2DModel`` in memory;
    ``scheduler_config`` (a dict or a scheduler) gives the DiffusionConfig. ``UNet.from_diffusers`` builds it."""
    config = unet_config_from_diffusers(model.config, fused=fused)
    diffusion = None
    if scheduler_config is not None:
        shape = (config.in_channels, config.image_size, config.image_size)
        diffusion = diffusion_config_from_diffusers(scheduler_config, shape)
    return config, diffusion, model.state_dict(), f"the {type(model).__name__}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _find_unet_dir(directory) -> Path:
    """The folder holding the UNet2DModel's config.json: ``directory`` itself, or its unet/ (a pipeline)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"diffusers checkpoint directory not found: {root}")
    for candidate in (root, root / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no UNet2DModel config.json in {root} (nor in {root / 'unet'})")


def _read_weights(unet_dir: Path):
    """The state_dict from diffusion_pytorch_model.safetensors, else .bin (torch.load with weights_only)."""
    for name in _WEIGHT_FILES:
        path = unet_dir / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                return load_file(str(path), device="cpu"), path
            return torch.load(path, map_location="cpu", weights_only=True), path
    if any(unet_dir.glob("diffusion_pytorch_model*.index.json")):
        raise ValueError(f"{unet_dir} holds a sharded checkpoint, which ddpm_fast does not read; a DDPM U-Net "
                         f"fits one file: re-save it with UNet2DModel.save_pretrained(..., max_shard_size='10GB')")
    raise FileNotFoundError(f"no weights in {unet_dir}: expected {unet_dir / _WEIGHT_FILES[0]} or "
                            f"{unet_dir / _WEIGHT_FILES[1]}")


def read_diffusers_checkpoint(directory, fused: bool = True):
    """(UNetConfig, DiffusionConfig or None, state_dict, weights path) of a saved UNet2DModel: ``directory`` with
    config.json and diffusion_pytorch_model.safetensors / .bin, or a pipeline directory with unet/ and scheduler/.
    The DiffusionConfig comes from scheduler_config.json beside config.json or in ../scheduler/ (None if neither).
    ``UNet.from_diffusers_checkpoint`` builds the model."""
    unet_dir = _find_unet_dir(directory)
    raw = _read_json(unet_dir / "config.json")
    if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{unet_dir / 'config.json'} describes a {raw['_class_name']}, not a UNet2DModel")
    config = unet_config_from_diffusers(raw, fused=fused)
    diffusion = None
    for path in (unet_dir / "scheduler_config.json", unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            shape = (config.in_channels, config.image_size, config.image_size)
            diffusion = diffusion_config_from_diffusers(_read_json(path), shape)
            break
    state_dict, weights_path = _read_weights(unet_dir)
    return config, diffusion, state_dict, str(weights_path)


def to_diffusers(unet):
    """A diffusers UNet2DModel with the weights, device, dtype and mode of ``unet``."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError("UNet.to_diffusers needs diffusers: pip install diffusers") from None
    if unet.config.ch_mult[0] != 1:
        raise ValueError(f"UNetConfig.ch_mult={unet.config.ch_mult}: diffusers' UNet2DModel needs ch_mult[0] == 1 "
                         "(its first level has as many channels as conv_in's output)")
    model = UNet2DModel(**diffusers_config_from_unet(unet.config))
    model.load_state_dict(unet.state_dict())
    param = next(unet.parameters())
    return model.to(device=param.device, dtype=param.dtype).train(unet.training)
