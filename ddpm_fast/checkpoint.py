"""Model files and training checkpoints: safetensors files written atomically (temp file + fsync + rename).

Model file (``save`` / ``load``), format "ddpm_fast.model/1": ONE .safetensors file, no JSON beside it.
    tensors   the U-Net's state_dict under its own names (``conv_in.weight``, ...), as stored in the model
    metadata  format, unet_config (JSON of UNetConfig.to_dict()), diffusion_config (JSON of
              DiffusionConfig.to_dict(), or "null"), info (optional free-form JSON: how it was made)
Training checkpoint (written by ddpm_fast.train), format "ddpm_fast.train/1": ONE .safetensors file.
    tensors   "model.<name>", "ema.<name>", "optim.<param index>.<state key>", "rng.<name>"
    metadata  format, unet_config, diffusion_config, and "state": JSON of the step, the TrainConfig, the
              optimizer's hyperparameters and parameter order, the GradScaler and the non-tensor RNG states.
``load`` reads both (a training checkpoint gives its EMA weights), a run directory (its model.safetensors,
else its checkpoint.safetensors) and bundled models by name (``BUNDLED_MODELS``). Every problem (missing,
truncated, not safetensors, wrong format, weights that do not fit the config) raises an error naming the file
and the problem, before a model is built.
"""
import json
import os
from typing import Dict, Optional, Tuple

import torch

from .files import ASSETS, read_safetensors, write_safetensors

MODEL_FORMAT = "ddpm_fast.model/1"
TRAIN_FORMAT = "ddpm_fast.train/1"
DEFAULT_MODEL = os.path.join(ASSETS, "default_digits.safetensors")
# Bundled models by name: load("digits-cond"), --checkpoint digits-cond. A name is used only when no file or
# directory of that name exists (a path always wins).
BUNDLED_MODELS = {"digits": "default_digits.safetensors", "digits-cond": "digits_cond.safetensors"}
RUN_MODEL, RUN_CHECKPOINT = "model.safetensors", "checkpoint.safetensors"  # names inside a run directory


def _unwrap(model):
    """The UNet inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def model_metadata(model, info: Optional[dict] = None) -> Dict[str, str]:
    """The metadata of a model file for ``model`` (a UNet): its configs as JSON strings."""
    from .models import UNet
    model = _unwrap(model)
    if not isinstance(model, UNet):
        raise TypeError(f"expected a ddpm_fast UNet, got {type(model).__name__}")
    diffusion = None if model.diffusion is None else model.diffusion.to_dict()
    meta = {"format": MODEL_FORMAT, "unet_config": json.dumps(model.config.to_dict()),
            "diffusion_config": json.dumps(diffusion)}
    if info is not None:
        meta["info"] = json.dumps(info)
    return meta


def save(model, path: str, info: Optional[dict] = None) -> str:
    """Writes ``model`` (a UNet, or DDP/compiled wrappers of one) to ``path`` (.safetensors) atomically.

    Weights are stored in the model's dtype; configs go in the file's metadata (see the module doc), with
    ``info`` (any JSON-ready dict) beside them. Returns ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    meta = model_metadata(model, info)
    write_safetensors(os.fspath(path), _unwrap(model).state_dict(), meta)
    return os.fspath(path)


def bundled_model_path(name: str) -> str:
    """The file of the bundled model ``name`` (a key of BUNDLED_MODELS); FileNotFoundError if it is missing."""
    path = DEFAULT_MODEL if name == "digits" else os.path.join(ASSETS, BUNDLED_MODELS[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the bundled {'default ' if name == 'digits' else ''}model {name!r} ({path}) is missing (not "
            f"trained yet, or the install left out package data); pass a path to a model file or a run directory")
    return path


def _resolve_path(path) -> str:
    if path is None:
        return bundled_model_path("digits")
    path = os.fspath(path)
    if isinstance(path, str) and path in BUNDLED_MODELS and not os.path.exists(path):
        return bundled_model_path(path)
    if os.path.isdir(path):
        for name in (RUN_MODEL, RUN_CHECKPOINT):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} is a directory holding neither {RUN_MODEL} nor {RUN_CHECKPOINT}")
    return path


def build_model(path: str, meta: dict, fused: bool = True):
    """A UNet (on the CPU, fp32) from a file's parsed metadata; errors name the file."""
    from .diffusion import DiffusionConfig
    from .models import UNet, UNetConfig
    try:
        config = UNetConfig.from_dict({**meta["unet_config"], "fused": bool(fused)})
        diffusion = meta.get("diffusion_config")
        diffusion = None if diffusion is None else DiffusionConfig.from_dict(diffusion)
        return UNet(config, diffusion)
    except KeyError as err:
        raise ValueError(f"{path}: metadata lacks {err}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its configs are invalid: {err}") from None


def load_weights(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, what: str = "weights"):
    """Copies ``state`` into ``module`` after checking names and shapes; the error lists every mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                 f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                 f"shape mismatches {shapes[:5]}" if shapes else ""]
        raise ValueError(f"{path}: the {what} do not fit the model its config describes: "
                         + "; ".join(p for p in parts if p))
    bad = [k for k, v in state.items() if not v.is_floating_point() and own[k].is_floating_point()]
    if bad:
        raise ValueError(f"{path}: tensors {bad[:5]} are not floating point")
    module.load_state_dict(state, strict=True)


def load(path=None, device="cpu", fused: bool = True):
    """A ready UNet (eval mode, float32, on ``device``) with ``.diffusion`` set, from a model file.

    path: a model file written by ``save``, a training checkpoint (its EMA weights), a run directory, or None
        for the bundled default model (ddpm_fast/assets/default_digits.safetensors: the tiny preset trained on
        scikit-learn's 8x8 digits), or the name of a bundled model when no such path exists: "digits" (the
        default) or "digits-cond" (the same recipe, class-conditional: labels 0-9 and the null label 10).
        fused: use the fused GroupNorm+SiLU op (same weights either way).
    device: "cpu", "cuda", "cuda:N" or a torch.device; CUDA without CUDA is a ValueError (checked first).
    """
    from .distributed import check_device
    device = check_device(device)
    path = _resolve_path(path)
    tensors, meta = read_safetensors(path, (MODEL_FORMAT, TRAIN_FORMAT))
    if meta["format"] == TRAIN_FORMAT:
        tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    model = build_model(path, meta, fused)
    load_weights(model, tensors, path, "EMA weights" if meta["format"] == TRAIN_FORMAT else "weights")
    return model.eval().to(device)


# ---- training checkpoints ------------------------------------------------------------------------------------

def rng_states() -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, JSON-ready dict) of the process's global RNGs: torch CPU and CUDA, NumPy, Python's random."""
    import random
    import numpy as np
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, py_gauss = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(py_state), py_gauss]}


def set_rng_states(tensors: Dict[str, torch.Tensor], states: dict) -> None:
    """Restores what ``rng_states`` returned (CUDA states only for the devices present)."""
    import random
    import numpy as np
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        for k in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(tensors[k], int(k.rsplit(".", 1)[1]))
    name, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = states["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def _json_scalar(v):
    """Optimizer hyperparameters as JSON: tensors (a capturable lr) become numbers, tuples lists."""
    if isinstance(v, torch.Tensor):
        return v.item()
    return list(v) if isinstance(v, tuple) else v


def optimizer_tensors(optimizer: torch.optim.Optimizer, param_names) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The optimizer's state flattened to "optim.<i>.<key>" tensors (i: index in ``param_names``, the
    optimizer's parameter order) + JSON: hyperparameters, parameter names, non-tensor state values."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value
            else:
                scalars[f"{i}.{key}"] = value
    groups = [{k: _json_scalar(v) for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "param_names": list(param_names), "scalars": scalars}


def restore_optimizer(optimizer, tensors: Dict[str, torch.Tensor], info: dict, param_names, path: str) -> None:
    """Loads a saved optimizer state ({"<i>.<key>": tensor}, the "optim." prefix removed, + its JSON) into
    ``optimizer`` after checking that it optimizes the same parameters in the same order. The optimizer keeps
    its own param_groups (lr is set every step; a capturable lr tensor must stay the same tensor)."""
    if list(param_names) != info["param_names"]:
        diff = next(i for i, (a, b) in enumerate(zip(param_names, info["param_names"] + [None])) if a != b)
        raise ValueError(f"{path}: the optimizer state is for other parameters (first difference at index {diff}:"
                         f" {info['param_names'][diff] if diff < len(info['param_names']) else None!r} vs "
                         f"{param_names[diff]!r})")
    state: Dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(info["scalars"].items()):
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    match_param_layouts(optimizer)


@torch.no_grad()
def match_param_layouts(optimizer) -> None:
    """Gives every optimizer state tensor shaped like its parameter the parameter's memory layout. Checkpoints
    store moments contiguous and ``load_state_dict`` keeps that, while a channels_last model's parameters (and
    grads) are channels_last: CUDA's fused AdamW requires equal layouts and fails at the first step otherwise."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def split_prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the entries "<prefix>.<name>"."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def write_training_checkpoint(path: str, model, ema: Dict[str, torch.Tensor], optimizer, param_names,
                              state: dict) -> None:
    """One atomic safetensors file: model, EMA, optimizer and RNG tensors; configs and ``state`` (step, train
    config, scaler, seeds: any JSON-ready dict) in the metadata. ``model`` is the (unwrapped) UNet."""
    model = _unwrap(model)
    meta = model_metadata(model)
    meta["format"] = TRAIN_FORMAT
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    opt_tensors, opt_info = optimizer_tensors(optimizer, param_names)
    rng_tensors, rng_info = rng_states()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    meta["state"] = json.dumps({**state, "optimizer": opt_info, "rng": rng_info})
    write_safetensors(path, tensors, meta)


def read_training_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, parsed metadata) of a training checkpoint; the metadata must hold a "state" entry."""
    tensors, meta = read_safetensors(path, (TRAIN_FORMAT,))
    for key in ("state", "unet_config"):
        if key not in meta:
            raise ValueError(f"{path}: training checkpoint metadata lacks {key!r}")
    for key in ("step", "train_config", "optimizer", "rng"):
        if key not in meta["state"]:
            raise ValueError(f"{path}: training checkpoint state lacks {key!r}")
    return tensors, meta
