"""Class labels and classifier-free guidance of a ``sample`` call: what a model must be to take labels, how
``labels=`` and ``guidance_scale=`` are checked and resolved (before any work), and what the chain then computes.

Guidance (Ho & Salimans 2022) with scale w: the prediction a step uses is u + w (c - u), c the model's output for
the sample's label and u its output for the null label (no class). So w = 0 is the unconditional model and w = 1
the conditional one; this w is the paper's w + 1 (the paper writes (1 + w) c - w u). How a chain runs:

    w = 0            "none"     the unconditional model: the labels change nothing (the images of ``labels=None``)
    w = 1            "labels"   the conditional model: B samples with their labels per model call, no guidance work
    any other w      "guided"   ONE model call per step on 2B samples (the labels, then the null label), the
                                combine inside the fused step kernel, w read from device memory
"""
import math

import numpy as np
import torch

# The guidance scale ``sample`` uses when labels are given without one: measured on the bundled digits-cond model
# (docs/guidance.md, "Choosing w").
DEFAULT_GUIDANCE_SCALE = 2.0
MODES = ("none", "labels", "guided")


def null_label(model, unet):
    """The model's null label K (labels 0..K-1 are classes), or a ValueError saying why it takes no labels: a
    ddpm_fast UNet needs UNetConfig(num_classes=K); another module an int attribute ``null_label`` (and then is
    called model(x_t, t, y) with labels, model(x_t, t) for its unconditional prediction)."""
    if unet is not None:
        if unet.null_label is None:
            raise ValueError("labels= needs a class-conditional model; this UNet is unconditional "
                             "(UNetConfig.num_classes=None): train one with --class-dropout, or load "
                             "'digits-cond'")
        return unet.null_label
    value = getattr(model, "null_label", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"labels= needs a class-conditional model: a ddpm_fast UNet with num_classes, or a module "
                         f"with an int attribute null_label >= 1 called as model(x_t, t, y); "
                         f"{type(model).__name__} has {'no null_label' if value is None else f'null_label={value!r}'}")
    return value


def resolve_conditioning(labels, guidance_scale, model, unet, n):
    """Checks ``labels`` and ``guidance_scale`` -> (labels as an (n,) int64 CPU tensor or None, the guidance
    scale as a float or None, the chain's mode, the null label or None). Wrong types raise TypeError, wrong values
    ValueError, before any work."""
    if labels is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale= needs labels= (the classes to guide towards); without labels the "
                             "model samples unconditionally")
        return None, None, "none", None
    null = null_label(model, unet)
    labels = _label_tensor(labels, n)
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > null:
            raise ValueError(f"labels must be classes 0..{null - 1} (or {null}, the null label: an unconditional "
                             f"image); got values in [{lo}, {hi}]")
    w = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else _check_scale(guidance_scale)
    mode = "none" if w == 0 else "labels" if w == 1 else "guided"
    return labels, w, mode, null


def _label_tensor(labels, n):
    """An int (every image), a sequence, array or tensor of n integer labels -> an (n,) int64 CPU tensor."""
    if isinstance(labels, bool):
        raise TypeError(f"labels must be an int, a sequence or tensor of n ints, or None; got {labels!r}")
    if not isinstance(labels, (torch.Tensor, np.ndarray)) and hasattr(labels, "__index__"):
        return torch.full((n,), int(labels), dtype=torch.int64)
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(labels)
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"labels must hold integers, got {tensor.dtype}")
        if tensor.dim() == 0:  # one label for every image
            return torch.full((n,), int(tensor), dtype=torch.int64)
    elif isinstance(labels, (list, tuple, range)):
        bad = next((v for v in labels if isinstance(v, bool) or not hasattr(v, "__index__")), None)
        if bad is not None:
            raise TypeError(f"labels must be integers, got {bad!r} ({type(bad).__name__})")
        tensor = torch.tensor([int(v) for v in labels], dtype=torch.int64)
    else:
        raise TypeError(f"labels must be an int, a sequence or tensor of n ints, or None; got "
                        f"{type(labels).__name__}")
    if tensor.dim() != 1 or tensor.shape[0] != n:
        raise ValueError(f"labels must hold one label per image: n = {n}, got shape {tuple(tensor.shape)}")
    return tensor.to("cpu", torch.int64)


def _check_scale(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"guidance_scale must be a float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"guidance_scale must be finite, got {value}")
    return float(value)
