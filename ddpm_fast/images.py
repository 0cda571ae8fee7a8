"""Writing samples to disk: an image grid (PNG, JPEG or WebP, chosen by the file's extension), an .npz array, one
PNG per image, each atomically (temp file + fsync + rename, so a crash never leaves a half-written file under the
final name).

``save_grid(samples, "grid.png", scale=4)`` is the public call (``ddpm_fast.save_grid``): ceil(sqrt(N)) images per
row, ``padding`` px of black between them, each image enlarged ``scale`` times by nearest neighbour (sharp pixels;
the padding is not scaled). JPEG is lossy (quality 95, no 4-channel images); PNG and WebP (lossless) keep every
pixel value.

Pixel values: x in [-1, 1] -> round((x + 1) * 127.5), clamped to 0..255 (the inverse of ddpm_fast.data's).
``save_npz`` writes two arrays: "images", float32 (N, C, H, W) in [-1, 1] (the raw samples; ``npz:FILE`` datasets
read it), and "arr_0", uint8 (N, H, W, C) (improved-/guided-diffusion's sample-file layout).
``save_uint8_npz`` streams uint8 (N, H, W, C) pixels into "arr_0" (labels into "arr_1"), one part at a time: the
evaluation batch that guided-diffusion's evaluator and other FID tools read, without holding all N in memory.
``save_pngs`` writes one PNG per image for folder-based FID tools (clean-fid, torch-fidelity, pytorch-fid).
"""
import math
import os
import zipfile

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


def save_npz(samples, path, labels=None):
    """Writes "images" (float32 NCHW, [-1, 1]) and "arr_0" (uint8 NHWC) to ``path``, and "arr_1": ``labels`` (N
    class labels, int64) when given; returns path."""
    _check(samples)
    raw = samples.detach().float().cpu().numpy()
    pixels = to_uint8(samples)
    arrays = {"images": raw, "arr_0": pixels}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
        if arrays["arr_1"].shape != (len(raw),):
            raise ValueError(f"labels must be one per image: {len(raw)}, got shape {arrays['arr_1'].shape}")

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)
    atomic_write(os.fspath(path), write)
    return os.fspath(path)


def check_pixels(pixels, what="pixels"):
    """pixels: a uint8 NumPy array (N, H, W, C), N >= 1 (as ``to_uint8`` returns)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 or not len(pixels):
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"{what} must be a non-empty uint8 NumPy array (N, H, W, C), got {got}")
    return pixels


def png_name(index, n):
    """The file name of image ``index`` of ``n``: zero-padded (at least 6 digits), so names sort in image order."""
    return f"{index:0{max(6, len(str(n - 1)))}d}.png"


def save_pngs(pixels, directory, first=0, n=None):
    """Writes uint8 (N, H, W, C) pixels, C in {1, 3, 4}, as one PNG per image into ``directory``: image i is
    ``png_name(first + i, n)`` (n: the whole set's size, for the name width; default first + N). Each file is
    renamed into place complete, without an fsync each (that costs ~10x the PNG itself): call ``os.sync()``
    once after the last batch to make the folder durable. Returns the file names."""
    from PIL import Image
    check_pixels(pixels)
    if pixels.shape[3] not in (1, 3, 4):
        raise ValueError(f"a PNG needs 1, 3 or 4 channels, the images have {pixels.shape[3]}")
    n = first + len(pixels) if n is None else n
    names = [png_name(first + i, n) for i in range(len(pixels))]
    os.makedirs(directory, exist_ok=True)
    for image, name in zip(pixels, names):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)

        def write(tmp, pil=pil):
            with open(tmp, "wb") as f:
                pil.save(f, format="PNG")
        atomic_write(os.path.join(directory, name), write, fsync=False)
    return names


def save_uint8_npz(path, parts, shape, labels=None):
    """Writes an uncompressed .npz at ``path`` (atomically) holding "arr_0": uint8 ``shape`` = (N, H, W, C),
    streamed from ``parts`` (an iterable of uint8 (b, H, W, C) arrays whose concatenation is arr_0, so only one
    part is in memory at a time), and "arr_1": ``labels`` (N,) int64 when given. The same bytes as
    ``np.savez(path, arr_0=..., arr_1=...)``, which guided-diffusion's evaluator streams batch by batch."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (N, H, W, C) with positive sizes, got {shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers of shape ({shape[0]},), got {labels.dtype} {labels.shape}")

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                _stream_npy(f, parts, shape)
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, labels.astype(np.int64), allow_pickle=False)
    atomic_write(os.fspath(path), write)
    return os.fspath(path)


def _stream_npy(f, parts, shape):
    """The .npy bytes of a C-order uint8 array of ``shape``, header first, then each part's bytes."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
    rows = 0
    for part in parts:
        check_pixels(part, "each part")
        if part.shape[1:] != shape[1:] or rows + len(part) > shape[0]:
            raise ValueError(f"part of shape {part.shape} does not continue arr_0 {shape} at image {rows}")
        f.write(np.ascontiguousarray(part).tobytes())
        rows += len(part)
    if rows != shape[0]:
        raise ValueError(f"the parts hold {rows} images, arr_0 needs {shape[0]}")
