"""Writing samples to disk: an image grid (PNG, JPEG or WebP, chosen by the file's extension) and an .npz array,
each atomically (temp file + fsync + rename, so a crash never leaves a half-written file under the final name).

``save_grid(samples, "grid.png", scale=4)`` is the public call (``ddpm_fast.save_grid``): ceil(sqrt(N)) images per
row, ``padding`` px of black between them, each image enlarged ``scale`` times by nearest neighbour (sharp pixels;
the padding is not scaled). JPEG is lossy (quality 95, no 4-channel images); PNG and WebP (lossless) keep every
pixel value.

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


# extension -> (Pillow format, channel counts it stores, save options)
FORMATS = {".png": ("PNG", (1, 3, 4), {}), ".jpg": ("JPEG", (1, 3), {"quality": 95}),
           ".jpeg": ("JPEG", (1, 3), {"quality": 95}), ".webp": ("WEBP", (1, 3, 4), {"lossless": True})}
MIN_AUTO_PIXELS = 32  # scale "auto": enlarge images smaller than this until they are at least this large


def check_image_path(path, channels=None) -> str:
    """The Pillow format for ``path``'s extension; ValueError for an unknown extension, a format this Pillow
    cannot write, or ``channels`` the format cannot store. Call it before the work that makes the images."""
    from PIL import features
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{os.fspath(path)!r}: unknown image extension {ext or '(none)'!r}; use one of "
                         f"{', '.join(FORMATS)} (or --npz for the raw array)")
    fmt, allowed, _ = FORMATS[ext]
    if fmt == "WEBP" and not features.check("webp"):
        raise ValueError(f"{os.fspath(path)!r}: this Pillow was built without WebP support; use .png")
    if channels is not None and channels not in allowed:
        raise ValueError(f"{os.fspath(path)!r}: {fmt} stores {' or '.join(map(str, allowed))} channels, the "
                         f"images have {channels}" + ("; use .png or .webp" if channels == 4 else
                                                      "; write them as .npz (save_npz, --npz)"))
    return fmt


def default_scale(image_hw) -> int:
    """scale "auto": the smallest integer making the images at least MIN_AUTO_PIXELS px (1 if already)."""
    return max(1, math.ceil(MIN_AUTO_PIXELS / max(1, min(image_hw))))


def upscale(images, scale: int):
    """(N, H, W, C) -> (N, H * scale, W * scale, C) by nearest neighbour (each pixel a scale x scale block)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    return images if scale == 1 else images.repeat(scale, axis=1).repeat(scale, axis=2)


def save_grid(samples, path, nrow=None, padding=2, scale=1):
    """Writes samples (N, C, H, W) in [-1, 1] as one image grid at ``path`` (atomically); the extension picks
    the format (.png, .jpg / .jpeg, .webp). scale: each image enlarged that many times (nearest neighbour).
    Returns the path."""
    from PIL import Image
    _check(samples)
    fmt = check_image_path(path, samples.shape[1])
    _, _, options = FORMATS[os.path.splitext(os.fspath(path))[1].lower()]
    grid = make_grid(upscale(to_uint8(samples), scale), nrow, padding)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)  # L, RGB or RGBA

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: PIL must not pick the format from the temp name
            image.save(f, format=fmt, **options)
    atomic_write(os.fspath(path), write)
    return os.fspath(path)


def save_grid_png(samples, path, nrow=None, padding=2):
    """Writes samples (N, C, H, W) in [-1, 1], C in {1, 3, 4}, as one PNG grid at ``path`` (whatever its
    extension); returns path. ``save_grid`` picks the format by the extension."""
    from PIL import Image
    _check(samples)
    channels = samples.shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(f"a PNG needs 1, 3 or 4 channels, the samples have {channels}: write them with --npz")
    grid = make_grid(to_uint8(samples), nrow, padding)
    image = Image.fromarray(grid[..., 0] if channels == 1 else grid)  # uint8 (H, W[, 3|4]): L, RGB or RGBA

    def write(tmp):
        with open(tmp, "wb") as f:
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
