"""Writing samples to disk: an image-grid PNG and an .npz array, each atomically (temp file + fsync + rename, so a
crash never leaves a half-written file under the final name).

Pixel values: x in [-1, 1] -> round((x + 1) * 127.5), clamped to 0..255 (the inverse of ddpm_fast.data's).
The .npz holds two arrays: "images", float32 (N, C, H, W) in [-1, 1] (the raw samples; ``npz:FILE`` datasets
read it), and "arr_0", uint8 (N, H, W, C) (improved-/guided-diffusion's sample-file layout).
"""
import math
import os

import numpy as np
import torch

from .files import atomic_write


def _check(samples, what="samples"):
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or not samples.is_floating_point():
        got = f"{samples.dtype} {tuple(samples.shape)}" if isinstance(samples, torch.Tensor) else \
            type(samples).__name__
        raise ValueError(f"{what} must be a float tensor (N, C, H, W) in [-1, 1], got {got}")
    if samples.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{what} contain NaN or inf")


def to_uint8(samples):
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 NumPy array."""
    _check(samples)
    x = ((samples.detach().float().cpu() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images, nrow=None, padding=2):
    """(N, H, W, C) uint8 -> one (rows * (H + p) + p, nrow * (W + p) + p, C) uint8 grid, black padding;
    nrow (images per row) defaults to ceil(sqrt(N))."""
    n, h, w, c = images.shape
    nrow = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[k]
    return grid


def save_grid_png(samples, path, nrow=None, padding=2):
    """Writes samples (N, C, H, W) in [-1, 1], C in {1, 3, 4}, as one PNG grid at ``path``; returns path."""
    from PIL import Image
    _check(samples)
    channels = samples.shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(f"a PNG needs 1, 3 or 4 channels, the samples have {channels}: write them with --npz")
    grid = make_grid(to_uint8(samples), nrow, padding)
    image = Image.fromarray(grid[..., 0] if channels == 1 else grid)  # uint8 (H, W[, 3|4]): L, RGB or RGBA

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: PIL must not pick the format from the temp name
            image.save(f, format="PNG")
    atomic_write(os.fspath(path), write)
    return os.fspath(path)


def save_npz(samples, path):
    """Writes "images" (float32 NCHW, [-1, 1]) and "arr_0" (uint8 NHWC) to ``path``; returns path."""
    _check(samples)
    raw = samples.detach().float().cpu().numpy()
    pixels = to_uint8(samples)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, images=raw, arr_0=pixels)
    atomic_write(os.fspath(path), write)
    return os.fspath(path)
