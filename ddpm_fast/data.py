"""Image datasets that need no network: digits, fashion-mnist, an image folder, an .npz array.

Every dataset is held as uint8 (N, C, H, W) in memory (compact: Fashion-MNIST's 60k images take 47 MB) and is
converted to float32 in [-1, 1] per item or per batch. ``ImageDataset`` is a map-style torch Dataset, so it
works with DataLoader and DistributedSampler.

Specs (``load_dataset(spec, ...)``):
    digits          scikit-learn's bundled 1797 8x8 images (values 0..16, stored rescaled to 0..255); needs
                    the ``[datasets]`` extra. Split: a fixed stratified one -- within each class, every 5th
                    image (in scikit-learn's order) is held out: 1442 train, 355 test.
    fashion-mnist   the IDX files of the Debian package ``dataset-fashion-mnist`` (default directory
                    /usr/share/datasets/fashion-mnist, or ``data_dir``); official split, 60000 + 10000, 28x28.
    folder:DIR      PNG/JPEG files found recursively (sorted by path). Grayscale when every image is
                    grayscale, RGB otherwise (gray images replicated, alpha dropped). With ``image_size`` each
                    image is resized (shorter side) and center-cropped; without it all images must share one
                    size. Labels: the first sub-directory under DIR when every image sits in one.
    npz:FILE        an .npz (or .npy) array; see ``_images_from_array`` for the accepted layouts and dtypes.
For folder/npz (no official split) every 10th image (index % 10 == 9) is held out as "test".
``split="all"`` returns every image of any dataset.
"""
import functools
import gzip
import os
import struct
from typing import List, Optional

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test", "all")
BUILTIN = ("digits", "fashion-mnist")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1]; 0 -> -1 and 255 -> 1 exactly."""
    return images.float() / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset of images kept as uint8.

    images: (N, C, H, W) uint8, values 0..255.   labels: (N,) int64 or None.
    ``ds[i]`` is a (C, H, W) float32 tensor in [-1, 1], horizontally flipped with probability 1/2 when
    ``flip`` (drawn from torch's global RNG, which DataLoader seeds per worker).
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, flip: bool = False,
                 name: str = "", split: str = "all", classes: Optional[List[str]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, C, H, W) with C in (1, 3); got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError(f"dataset {name!r} split {split!r} holds no images")
        if labels is not None and labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},); got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = None if labels is None else labels.long()
        self.flip = bool(flip)
        self.name, self.split, self.classes = name, split, classes

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> Optional[int]:
        if self.labels is None:
            return None
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = to_float(self.images[i])
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def batch(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None,
              device=None) -> torch.Tensor:
        """A batch without a DataLoader: (B,) int64 indices -> (B, C, H, W) float32 in [-1, 1] on ``device``.

        Flips (when ``flip``) are drawn from ``generator`` (CPU), so a trainer can make them reproducible.
        """
        x = to_float(self.images[indices].to(device))
        if self.flip:
            mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x

    def tensor(self, device=None) -> torch.Tensor:
        """All images, unflipped: (N, C, H, W) float32 in [-1, 1] on ``device`` (converted there)."""
        return to_float(self.images.to(device))

    def __repr__(self):
        c, h, w = self.shape
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, shape=({c}, {h}, {w}), "
                f"labels={self.labels is not None}, flip={self.flip})")


def load_dataset(spec: str, split: str = "train", data_dir: Optional[str] = None,
                 image_size: Optional[int] = None, flip: bool = False) -> ImageDataset:
    """Loads a dataset by spec: "digits", "fashion-mnist", "folder:DIR" or "npz:FILE" (see the module doc).

    split: "train" | "test" (held out) | "all".   data_dir: where fashion-mnist's IDX files are; for folder/npz
    a base for a relative path.   image_size: resize (shorter side, bicubic, antialiased) + center-crop to
    image_size x image_size.   flip: random horizontal flips in ``__getitem__`` / ``batch`` (training only).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string; got {spec!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if image_size is not None and (type(image_size) is not int or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None; got {image_size!r}")
    if spec == "digits":
        if data_dir is not None:
            raise ValueError("'digits' is bundled with scikit-learn and takes no data_dir")
        images, labels, classes = _load_digits(split)
    elif spec == "fashion-mnist":
        images, labels, classes = _load_fashion_mnist(split, data_dir or FASHION_MNIST_DIR)
    elif spec.startswith("folder:"):
        images, labels, classes = _load_folder(_resolve(spec[7:], data_dir, spec), image_size)
        images, labels = _heldout_split(images, labels, split, spec)
    elif spec.startswith("npz:"):
        images, labels = _load_npz(_resolve(spec[4:], data_dir, spec))
        images, labels = _heldout_split(images, labels, split, spec)
        classes = None
    else:
        raise ValueError(f"unknown dataset {spec!r}; expected one of {BUILTIN}, 'folder:DIR' or 'npz:FILE'")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        images = resize_center_crop(images, image_size)
    return ImageDataset(images, labels, flip=flip, name=spec, split=split, classes=classes)


def reference_batch(spec: str, split: str = "train", n: Optional[int] = None, data_dir: Optional[str] = None,
                    image_size: Optional[int] = None) -> np.ndarray:
    """A dataset's real images as the uint8 (N, H, W, C) array FID tools compare samples with (the "reference
    batch" of guided-diffusion's evaluator): the first ``n`` images of the split in the dataset's order (all by
    default), unflipped, pixel for pixel as stored. Arguments as ``load_dataset``."""
    images = load_dataset(spec, split, data_dir=data_dir, image_size=image_size).images
    if n is not None:
        if type(n) is not int or not 1 <= n <= len(images):
            raise ValueError(f"n must be an int in [1, {len(images)}] ({spec} {split} holds {len(images)} "
                             f"images); got {n!r}")
        images = images[:n]
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _resolve(path: str, data_dir: Optional[str], spec: str) -> str:
    if not path:
        raise ValueError(f"dataset spec {spec!r} names no path")
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) or data_dir is None else os.path.join(data_dir, path)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): shorter side scaled to ``size`` (bicubic, antialiased
    when shrinking), then the center size x size crop."""
    n, c, h, w = images.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    for start in range(0, n, 1024):  # bounded float32 temporaries for big datasets
        x = images[start:start + 1024].float()
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True,
                                            align_corners=False)
        out[start:start + 1024] = x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return out


def _select_split(images, labels, test_mask, split):
    if split == "all":
        return images, labels
    keep = test_mask if split == "test" else ~test_mask
    return images[keep], None if labels is None else labels[keep]


def _heldout_split(images, labels, split, spec):
    """folder/npz: every 10th image (index % 10 == 9) is the held-out "test" split."""
    test_mask = torch.arange(len(images)) % 10 == 9
    if split == "test" and not test_mask.any():
        raise ValueError(f"{spec} has {len(images)} images; its held-out split (every 10th image) is empty")
    return _select_split(images, labels, test_mask, split)


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    """scikit-learn's digits as (uint8 (1797, 8, 8) in 0..255, int64 labels); cached: the import is slow."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'ddpm_fast[datasets]' "
                          f"(or pip install scikit-learn) [{err}]") from None
    bunch = load_digits()
    # 0..16 -> 0..255 so that every dataset shares one uint8 convention.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def _load_digits(split):
    images, labels = _digits_arrays()
    images, labels = torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.copy())
    # Fixed stratified split without an RNG: the 5th, 10th, ... image of each class is held out.
    rank_in_class = torch.zeros(len(labels), dtype=torch.long)
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        rank_in_class[idx] = torch.arange(len(idx))
    test_mask = rank_in_class % 5 == 4
    images, labels = _select_split(images, labels, test_mask, split)
    return images, labels, [str(k) for k in range(10)]


def _load_fashion_mnist(split, data_dir):
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
    parts = ["train", "test"] if split == "all" else [split]
    images, labels = [], []
    for part in parts:
        img_name, lab_name = FASHION_MNIST_FILES[part]
        x = read_idx(_find_idx(data_dir, img_name))
        y = read_idx(_find_idx(data_dir, lab_name))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST files in {data_dir} disagree: images {x.shape}, labels {y.shape}")
        images.append(torch.from_numpy(x)[:, None])
        labels.append(torch.from_numpy(y.astype(np.int64)))
    return torch.cat(images), torch.cat(labels), classes


def _find_idx(data_dir, name):
    for candidate in (name + ".gz", name):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {data_dir}. Install the data with "
        f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) or pass data_dir / "
        f"--data-dir pointing at a directory holding the four IDX files.")


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes: the MNIST format. Returns a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()}, expected "
                         f"0000 08 <ndim>)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes but the file holds "
                         f"{len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()



# --- folder:DIR -------------------------------------------------------------------------------------------

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


def _list_images(root):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise ValueError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {root}")
    return sorted(paths)


def _load_folder(root, image_size):
    """Two passes: headers first (mode and size, no decoding) to fix the channel count and check sizes, then
    decode + convert + resize one image at a time into one preallocated uint8 tensor."""
    from PIL import Image
    paths = _list_images(root)
    modes, sizes = [], []
    for p in paths:
        try:
            with Image.open(p) as img:
                modes.append(img.mode)
                sizes.append(img.size)
        except OSError as err:
            raise ValueError(f"cannot read image {p}: {err}") from None
    rgb = any(m not in _GRAY_MODES for m in modes)
    if image_size is None and len(set(sizes)) > 1:
        (w0, h0), i = sizes[0], next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise ValueError(f"images under {root} differ in size ({paths[0]}: {w0}x{h0}, {paths[i]}: "
                         f"{sizes[i][0]}x{sizes[i][1]}); pass image_size to resize and center-crop them")
    w, h = (image_size, image_size) if image_size is not None else sizes[0]
    out = torch.empty(len(paths), 3 if rgb else 1, h, w, dtype=torch.uint8)
    for i, p in enumerate(paths):
        x = _read_image(p, rgb)
        out[i] = x if x.shape[1:] == (h, w) else resize_center_crop(x[None], image_size)[0]
    labels, classes = _labels_from_dirs(paths, root)
    return out, labels, classes


def _read_image(path, rgb):
    """One image file -> uint8 (C, H, W), C = 3 if rgb else 1. 16-bit grayscale is scaled to 8 bits."""
    from PIL import Image
    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I"):
            # PIL's I -> L conversion clips instead of scaling; 16-bit PNGs hold 0..65535.
            arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
            img = Image.fromarray(np.rint(arr).clip(0, 255).astype(np.uint8), mode="L")
        arr = np.asarray(img.convert("RGB" if rgb else "L"), dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _labels_from_dirs(paths, root):
    """Labels from the first sub-directory under root, when every image sits in one (ImageFolder layout)."""
    firsts = [os.path.relpath(p, root).split(os.sep) for p in paths]
    if any(len(parts) < 2 for parts in firsts):
        return None, None
    classes = sorted({parts[0] for parts in firsts})
    index = {c: k for k, c in enumerate(classes)}
    return torch.tensor([index[parts[0]] for parts in firsts], dtype=torch.long), classes


# --- npz:FILE ---------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("images", "x", "arr_0")
_LABEL_KEYS = ("labels", "y")


def _load_npz(path):
    """An .npz holding "images" (or "x", "arr_0", or a single array) and optionally "labels" (or "y"), or an
    .npy holding just the images. Loaded with allow_pickle=False."""
    import zipfile
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file {path} not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz/.npy file: {err}") from None
    if isinstance(data, np.ndarray):
        return _images_from_array(data, path), None
    with data:
        keys = list(data.files)
        key = next((k for k in _IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path} holds arrays {keys}; name the images array one of {_IMAGE_KEYS}")
        images = _images_from_array(data[key], f"{path}[{key!r}]")
        label_key = next((k for k in _LABEL_KEYS if k in keys), None)
        labels = None if label_key is None else _labels_from_array(data[label_key], len(images),
                                                                   f"{path}[{label_key!r}]")
    return images, labels


def _images_from_array(arr: np.ndarray, where: str = "array") -> torch.Tensor:
    """Accepted: (N, H, W) grayscale, (N, C, H, W) or (N, H, W, C) with C in {1, 3};
    uint8 (or any integer dtype) in 0..255, or float in [0, 1] or [-1, 1] (data within [0, 1] is read as
    [0, 1]; floats are quantized to 8 bits). Returns uint8 (N, C, H, W)."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        nchw, nhwc = arr.shape[1] in (1, 3), arr.shape[3] in (1, 3)
        if nchw == nhwc:
            why = "ambiguous" if nchw else "no channel axis of size 1 or 3"
            raise ValueError(f"{where}: shape {arr.shape} is {why}; expected (N, H, W), (N, C, H, W) or "
                             f"(N, H, W, C) with C = 1 (grayscale) or 3 (RGB)")
        arr = arr if nchw else arr.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{where}: expected (N, H, W), (N, C, H, W) or (N, H, W, C) images; got shape "
                         f"{arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{where}: empty image array of shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(_to_uint8(arr, where)))


def _to_uint8(arr, where):
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{where}: images must be uint8, integer 0..255 or float; got dtype {arr.dtype}")
    lo, hi = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer images must lie in 0..255; got values in [{lo}, {hi}]")
        return arr.astype(np.uint8)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: images contain NaN or inf")
    x = arr.astype(np.float64)
    if lo >= 0 and hi <= 1:
        return np.rint(x * 255.0).astype(np.uint8)
    if lo >= -1 and hi <= 1:
        return np.rint((x + 1.0) * 127.5).astype(np.uint8)
    raise ValueError(f"{where}: float images must lie in [0, 1] or [-1, 1]; got values in [{lo:g}, {hi:g}]")


def _labels_from_array(arr, n, where):
    arr = np.asarray(arr)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers of shape ({n},); got {arr.dtype} {arr.shape}")
    if n and arr.min() < 0:
        raise ValueError(f"{where}: labels must be non-negative; got min {arr.min()}")
    return torch.from_numpy(arr.astype(np.int64))
