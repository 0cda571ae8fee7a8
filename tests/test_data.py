"""Datasets: each loader, the uint8 -> [-1, 1] contract, splits, flips, DistributedSampler, bad input."""
import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from ddpm_fast.data import (FASHION_MNIST_DIR, ImageDataset, load_dataset, read_idx, resize_center_crop,
                            to_float)

HAS_FASHION = all(os.path.isfile(os.path.join(FASHION_MNIST_DIR, f"{name}-idx{d}-ubyte.gz"))
                  for name, d in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3),
                                  ("t10k-labels", 1)))


def _check_float_images(x, shape):
    assert x.dtype == torch.float32 and tuple(x.shape[-3:]) == shape
    assert x.min() >= -1 and x.max() <= 1


# --- the common contract -----------------------------------------------------------------------------------

def test_to_float_endpoints_exact():
    u = torch.arange(256, dtype=torch.uint8)
    x = to_float(u)
    assert x[0] == -1 and x[255] == 1 and x.dtype == torch.float32
    assert (x.double() - (u.double() / 127.5 - 1)).abs().max() <= 2 ** -23  # float32 rounding only


def test_digits_splits_and_values():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    train, test, full = (load_dataset("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1442, 355, 1797)
    assert train.shape == test.shape == (1, 8, 8) and train.images.dtype == torch.uint8
    want = torch.from_numpy(np.round(load_digits().images * 255 / 16).astype(np.uint8))[:, None]
    assert torch.equal(full.images, want)
    # Stratified: every class is in both splits in the same 4:1 proportion (+-1 image).
    tr, te = train.labels.bincount(minlength=10), test.labels.bincount(minlength=10)
    assert torch.equal(tr + te, full.labels.bincount())
    assert ((tr - 4 * te).abs() <= 4).all()
    # Disjoint and covering: the held-out images are exactly the rows the split rule selects.
    rows = {tuple(r.tolist()) + (int(y),) for r, y in zip(full.images.flatten(1), full.labels)}
    got = {tuple(r.tolist()) + (int(y),) for d in (train, test) for r, y in zip(d.images.flatten(1), d.labels)}
    assert got == rows
    assert load_dataset("digits", "test").images.equal(test.images)  # deterministic


def test_getitem_tensor_and_batch_agree(seed):
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", "test")
    all_x = ds.tensor()
    _check_float_images(all_x, (1, 8, 8))
    i = int(torch.randint(len(ds), ()))
    assert torch.equal(ds[i], all_x[i])
    idx = torch.randint(len(ds), (17,))
    assert torch.equal(ds.batch(idx), all_x[idx])


def test_flip_augmentation(seed):
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", "train", flip=True)
    plain = to_float(ds.images)
    idx = torch.arange(64)
    out = ds.batch(idx, generator=torch.Generator().manual_seed(seed))
    same = (out == plain[idx]).flatten(1).all(1)
    flipped = (out == plain[idx].flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and flipped.any() and same.any()
    assert torch.equal(out, ds.batch(idx, generator=torch.Generator().manual_seed(seed)))
    items = torch.stack([ds[0] for _ in range(40)])
    assert {tuple(v.flatten().tolist()) for v in items} == {tuple(plain[0].flatten().tolist()),
                                                            tuple(plain[0].flip(-1).flatten().tolist())}


def test_distributed_sampler_and_pickle():
    pytest.importorskip("sklearn")
    from torch.utils.data import DataLoader, DistributedSampler
    ds = load_dataset("digits", "test")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        batches = list(DataLoader(ds, batch_size=32, sampler=sampler))
        assert batches[0].shape == (32, 1, 8, 8) and batches[0].dtype == torch.float32
        seen += list(sampler)
    assert sorted(set(seen)) == list(range(len(ds)))  # the two ranks cover the whole split
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers pickle the dataset
    assert torch.equal(clone.images, ds.images) and torch.equal(clone.labels, ds.labels)


def test_digits_resized():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", "test", image_size=16)
    assert ds.images.shape == (355, 1, 16, 16) and ds.images.dtype == torch.uint8


def test_digits_without_sklearn(monkeypatch):
    import ddpm_fast.data as data
    data._digits_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"ddpm_fast\[datasets\]"):
        load_dataset("digits")
    data._digits_arrays.cache_clear()


@pytest.mark.parametrize("kwargs, match", [
    (dict(spec="cifar10"), "unknown dataset"), (dict(spec=""), "non-empty"), (dict(spec="folder:"), "no path"),
    (dict(spec="digits", split="val"), "split"), (dict(spec="digits", image_size=0), "image_size"),
    (dict(spec="digits", data_dir="/tmp"), "no data_dir")])
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))


def test_resize_center_crop_is_centered():
    img = torch.zeros(1, 3, 10, 20, dtype=torch.uint8)
    img[:, :, :, 5:15] = 200  # the central 10x10 block
    out = resize_center_crop(img, 10)  # shorter side already 10: a pure center crop
    assert out.shape == (1, 3, 10, 10) and (out == 200).all()
    flat = torch.full((2, 1, 9, 13), 77, dtype=torch.uint8)
    assert (resize_center_crop(flat, 5) == 77).all() and (resize_center_crop(flat, 31) == 77).all()


# --- fashion-mnist ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert (len(train), len(test)) == (60000, 10000) and train.shape == (1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.images.max() == 255 and train.images.min() == 0
    _check_float_images(test[3], (1, 28, 28))


def _write_idx(path, arr, gz):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, gz, seed):
    rng = np.random.default_rng(seed)
    sizes = {"train": 7, "t10k": 3}
    arrays = {}
    for part, n in sizes.items():
        arrays[part] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        suffix = ".gz" if gz else ""
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte{suffix}", arrays[part][0], gz)
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte{suffix}", arrays[part][1], gz)
    ds = load_dataset("fashion-mnist", "test", data_dir=str(tmp_path))
    assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays["t10k"][0].astype(np.uint8)))
    assert torch.equal(ds.labels, torch.from_numpy(arrays["t10k"][1]))
    assert len(load_dataset("fashion-mnist", "all", data_dir=str(tmp_path))) == 10


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float dtype code
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x01" * 9)
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(short))
    notgz = tmp_path / "x.gz"
    notgz.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(str(notgz))


# --- folder:DIR ----------------------------------------------------------------------------------------------

def _save(path, arr, **kw):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return arr


def test_folder_exact_pixels_and_labels(tmp_path, seed):
    rng = np.random.default_rng(seed)
    want = {}
    for cls in ("cat", "ant"):
        for k in range(6):
            path = str(tmp_path / cls / f"{k}.png")
            want[path] = _save(path, rng.integers(0, 256, (11, 7, 3), dtype=np.uint8))
    ds = load_dataset(f"folder:{tmp_path}", "all")
    assert ds.shape == (3, 11, 7) and ds.classes == ["ant", "cat"]
    for i, path in enumerate(sorted(want)):  # sorted by path; PNG is lossless
        assert torch.equal(ds.images[i], torch.from_numpy(want[path]).permute(2, 0, 1))
        assert ds.labels[i] == (0 if "/ant/" in path else 1)
    train, test = load_dataset(f"folder:{tmp_path}", "train"), load_dataset(f"folder:{tmp_path}", "test")
    assert (len(train), len(test)) == (11, 1) and torch.equal(test.images[0], ds.images[9])


def test_folder_mixed_sizes_gray_rgb_jpeg(tmp_path, seed):
    rng = np.random.default_rng(seed)
    _save(str(tmp_path / "a.png"), rng.integers(0, 256, (13, 9), dtype=np.uint8))          # grayscale
    _save(str(tmp_path / "b.jpg"), rng.integers(0, 256, (5, 17, 3), dtype=np.uint8), quality=95)
    _save(str(tmp_path / "sub" / "c.PNG"), rng.integers(0, 256, (20, 20, 4), dtype=np.uint8))  # RGBA
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="differ in size.*image_size"):
        load_dataset(f"folder:{tmp_path}")
    ds = load_dataset(f"folder:{tmp_path}", "all", image_size=6)
    assert ds.images.shape == (3, 3, 6, 6) and ds.labels is None  # one image sits in the root: no labels
    gray = ds.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])  # gray replicated to RGB
    _check_float_images(ds[1], (3, 6, 6))


def test_folder_grayscale_and_16bit(tmp_path, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    a = _save(str(tmp_path / "a.png"), rng.integers(0, 256, (8, 10), dtype=np.uint8))
    deep = rng.integers(0, 65536, (8, 10), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "b.png")
    ds = load_dataset(f"folder:{tmp_path}", "all")
    assert ds.shape == (1, 8, 10)
    assert torch.equal(ds.images[0, 0], torch.from_numpy(a))
    want_b = np.rint(deep / 65535.0 * 255.0).astype(np.uint8)
    assert np.abs(ds.images[1, 0].numpy().astype(int) - want_b).max() <= 1


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_relative_to_data_dir(tmp_path, seed):
    _save(str(tmp_path / "imgs" / "x.png"), np.full((4, 4), 9, dtype=np.uint8))
    ds = load_dataset("folder:imgs", "all", data_dir=str(tmp_path))
    assert ds.images.shape == (1, 1, 4, 4) and (ds.images == 9).all()


# --- npz:FILE ------------------------------------------------------------------------------------------------

def _npz(tmp_path, name="d.npz", **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_layouts_uint8_exact(tmp_path, layout, seed):
    rng = np.random.default_rng(seed)
    c = 1 if layout == "NHW" else 3
    nchw = rng.integers(0, 256, (23, c, 9, 5), dtype=np.uint8)
    arr = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout]
    labels = rng.integers(0, 4, 23)
    ds = load_dataset(_npz(tmp_path, images=arr, labels=labels), "all")
    assert torch.equal(ds.images, torch.from_numpy(nchw)) and torch.equal(ds.labels, torch.from_numpy(labels))
    test = load_dataset(_npz(tmp_path, images=arr, labels=labels), "test")
    assert torch.equal(test.images, torch.from_numpy(nchw[[9, 19]]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("scale", ["01", "pm1"])
def test_npz_float_ranges(tmp_path, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (6, 1, 7, 7)).astype(np.uint8)
    u8[0, 0, 0, 0], u8[0, 0, 0, 1] = 0, 255  # both ends present, so the range is unambiguous
    x = u8 / 255.0 if scale == "01" else u8 / 127.5 - 1.0
    ds = load_dataset(_npz(tmp_path, x=x.astype(dtype)), "all")
    # float16 cannot hold every k/255 exactly: allow one level.
    assert (ds.images.int() - torch.from_numpy(u8).int()).abs().max() <= (1 if dtype == np.float16 else 0)


def test_npz_int_and_npy(tmp_path, seed):
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (4, 6, 6, 1))
    path = tmp_path / "a.npy"
    np.save(path, u8)  # int64, NHWC gray
    ds = load_dataset(f"npz:{path}", "all")
    assert ds.shape == (1, 6, 6) and torch.equal(ds.images, torch.from_numpy(u8.astype(np.uint8)).permute(0, 3, 1, 2))
    assert ds.labels is None


@pytest.mark.parametrize("arrays, match", [
    (dict(images=np.zeros((2, 5, 4, 4, 3), np.uint8)), "expected"),
    (dict(images=np.zeros((2, 8, 8, 4), np.uint8)), "no channel axis"),
    (dict(images=np.zeros((2, 3, 8, 3), np.uint8)), "ambiguous"),
    (dict(images=np.full((2, 8, 8), 1.5, np.float32)), r"\[0, 1\] or \[-1, 1\]"),
    (dict(images=np.full((2, 8, 8), np.nan, np.float32)), "NaN"),
    (dict(images=np.zeros((2, 8, 8), bool)), "dtype"),
    (dict(images=np.full((2, 8, 8), 300, np.int32)), "0..255"),
    (dict(images=np.zeros((0, 8, 8), np.uint8)), "empty"),
    (dict(images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(2, np.int64)), "labels"),
    (dict(images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3, np.float32)), "labels"),
    (dict(a=np.zeros((3, 8, 8), np.uint8), b=np.zeros(3, np.int64)), "name the images"),
])
def test_npz_bad_arrays(tmp_path, arrays, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(_npz(tmp_path, **arrays), "all")


def test_npz_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="not a readable"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    np.savez(tmp_path / "obj.npz", images=np.array([object(), object()], dtype=object))
    with pytest.raises(ValueError, match="not a readable|pickle"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")
    with pytest.raises(ValueError, match="held-out split"):
        load_dataset(_npz(tmp_path, images=np.zeros((5, 4, 4), np.uint8)), "test")
