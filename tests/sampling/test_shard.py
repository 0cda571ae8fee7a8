"""ddpm_fast.sample_to_dir in one process: the images are sample()'s, bitwise; a rerun resumes and never uses a
missing, truncated, corrupt or foreign chunk file; other settings are refused before any work; bad input fails
first; the files are in the layouts FID tools read. (Several processes under torchrun: test_shard_torchrun.py.)"""
import glob
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast
from ddpm_fast import UNet, sample_to_dir
from ddpm_fast.images import to_uint8
from ddpm_fast.sampling import chunkfiles, last_run_info
from ddpm_fast.sampling import graphs as sampler_graph

from fake_graphs import ReplayBody

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_unet(channels=1, init=0):
    torch.manual_seed(init)
    return UNet.preset("tiny", ch_mult=(1, 2), in_channels=channels)


def expected(model, n, seed, steps=3, batch_size=3, **kw):
    """What sample_to_dir promises: sample() of the same settings, converted by images.to_uint8."""
    return to_uint8(ddpm_fast.sample(model, n, steps, seed=seed, batch_size=batch_size, progress=False, **kw))


def arr0(path):
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        return f["arr_0"]


def snapshot(directory):
    """{relative path: (size, mtime_ns)} of every file under directory."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size, st.st_mtime_ns)
    return out


def test_samples_npz_is_sample_converted_to_uint8(tmp_path, seed):
    model = tiny_unet()
    run = sample_to_dir(model, 7, tmp_path / "run", png_dir=tmp_path / "png", progress=False, steps=3, seed=seed,
                        batch_size=3)
    want = expected(model, 7, seed)
    got = arr0(run.path)
    assert got.dtype == np.uint8 and got.shape == (7, 8, 8, 1) and np.array_equal(got, want)
    assert run.path == str(tmp_path / "run" / "samples.npz") and (run.n, run.drawn, run.reused) == (7, 7, 0)
    assert run.world_size == 1 and run.rank_images == [7] and run.removed == []
    assert "7 images in" in run.summary() and "rank 0:" in run.summary()
    assert sorted(os.listdir(tmp_path / "run")) == ["chunks", "manifest.json", "samples.npz"]
    assert sorted(os.listdir(tmp_path / "run" / "chunks")) == [f"chunk_00000{k}.safetensors" for k in range(3)]
    settings = json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]
    assert {k: settings[k] for k in ("n", "seed", "steps", "batch", "sampler", "dtype", "device", "shape")} == {
        "n": 7, "seed": seed, "steps": 3, "batch": 3, "sampler": "ddpm", "dtype": "torch.float32", "device": "cpu",
        "shape": [1, 8, 8]}
    names = sorted(os.listdir(tmp_path / "png"))
    assert names == [f"{i:06d}.png" for i in range(7)]
    for i, name in enumerate(names):
        with Image.open(tmp_path / "png" / name) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), want[i, :, :, 0])


def test_rerun_resumes_and_redraws_every_chunk_file_it_cannot_trust(tmp_path, seed):
    model, run_dir = tiny_unet(), tmp_path / "run"
    kw = dict(steps=3, seed=seed, batch_size=3, progress=False)
    want = arr0(sample_to_dir(model, 13, run_dir, **kw).path)  # chunks of 3, 3, 3, 3, 1
    foreign_dir = tmp_path / "other"
    sample_to_dir(model, 13, foreign_dir, **{**kw, "seed": seed + 1})
    chunks = run_dir / "chunks"
    names = sorted(os.listdir(chunks))
    (chunks / names[0]).unlink()                                            # never written
    data = (chunks / names[1]).read_bytes()
    (chunks / names[1]).write_bytes(data[: len(data) // 2])                 # truncated
    shutil.copy(foreign_dir / "chunks" / names[2], chunks / names[2])       # another run's chunk 2
    corrupt = bytearray((chunks / names[3]).read_bytes())
    corrupt[-1] ^= 1                                                        # one pixel bit flipped
    (chunks / names[3]).write_bytes(bytes(corrupt))
    (chunks / ".tmp_x_chunk_000004.safetensors").write_bytes(b"partial")    # an interrupted write
    shutil.copy(chunks / names[4], chunks / "chunk_000009.safetensors")    # not a chunk of this run
    (chunks / "notes.txt").write_text("mine")                               # not ours: left alone
    (run_dir / "samples.npz").unlink()
    again = sample_to_dir(model, 13, run_dir, **kw)
    assert (again.drawn, again.reused) == (12, 1)  # chunks 0-3 drawn again (3 images each); chunk 4 reused
    reasons = dict(again.removed)
    assert reasons.keys() == {names[1], names[2], names[3], ".tmp_x_chunk_000004.safetensors",
                              "chunk_000009.safetensors"}
    assert "unreadable" in reasons[names[1]] and "belongs to another run" in reasons[names[2]]
    assert "do not match their checksum" in reasons[names[3]] and "temp file" in reasons[
        ".tmp_x_chunk_000004.safetensors"] and "not a chunk of this run" in reasons["chunk_000009.safetensors"]
    assert np.array_equal(arr0(again.path), want)
    assert sorted(os.listdir(chunks)) == sorted(names + ["notes.txt"])
    done = sample_to_dir(model, 13, run_dir, **{**kw, "cuda_graph": False})  # how it runs is not a setting
    assert (done.drawn, done.reused) == (0, 13) and np.array_equal(arr0(done.path), want)


def test_a_chunk_file_under_another_index_is_not_used(tmp_path, seed):
    model, run_dir = tiny_unet(), tmp_path / "run"
    kw = dict(steps=2, seed=seed, batch_size=2, progress=False)
    want = arr0(sample_to_dir(model, 4, run_dir, **kw).path)
    chunks = run_dir / "chunks"
    shutil.copy(chunks / "chunk_000000.safetensors", chunks / "chunk_000001.safetensors")
    again = sample_to_dir(model, 4, run_dir, **kw)
    assert again.removed == [("chunk_000001.safetensors", "holds chunk 0, not 1")] and again.drawn == 2
    assert np.array_equal(arr0(again.path), want)


CHANGES = [({"seed": 1}, r"seed: 0 in the directory, 1 now"),
           ({"steps": 4}, r"steps: 3 in the directory, 4 now\. Run with the same settings"),
           ({"sampler": "ddim"}, r'sampler: "ddpm" in the directory, "ddim" now'),
           ({"batch_size": 2}, r"batch: 3 in the directory, 2 now"),
           ({"dtype": torch.bfloat16}, r'dtype: "torch.float32" in the directory, "torch.bfloat16" now'),
           ({"n": 6}, r"n: 5 in the directory, 6 now"),
           ({"init": 1}, r"the model's weights differ \(another checkpoint\)"),
           ({"channels": 3}, r"shape: \[1, 8, 8\] in the directory, \[3, 8, 8\] now")]


@pytest.mark.parametrize("change,match", CHANGES, ids=[next(iter(c)) for c, _ in CHANGES])
def test_other_settings_are_refused_before_any_work(tmp_path, change, match):
    base = dict(n=5, steps=3, seed=0, batch_size=3, spacing="linspace")  # the same chain for either sampler
    sample_to_dir(tiny_unet(), out_dir=tmp_path, progress=False, **base)
    before = snapshot(tmp_path)
    model = tiny_unet(change.pop("channels", 1), change.pop("init", 0))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="holds a run with other settings: " + match):
        sample_to_dir(model, out_dir=tmp_path, progress=False, **{**base, **change})
    assert snapshot(tmp_path) == before and calls == []
    run = sample_to_dir(model, out_dir=tmp_path, progress=False, overwrite=True, **{**base, **change})
    assert run.drawn == run.n and calls  # overwrite: started over (and the hook does see the model run)
    assert np.array_equal(arr0(run.path), expected(model, **{**base, **change}))


def test_seed_none_draws_one_and_a_rerun_keeps_it(tmp_path):
    model = tiny_unet()
    torch.manual_seed(5)
    first = sample_to_dir(model, 4, tmp_path, steps=2, batch_size=2, progress=False)
    seed = json.loads((tmp_path / "manifest.json").read_text())["settings"]["seed"]
    assert np.array_equal(arr0(first.path), expected(model, 4, seed, 2, 2))
    again = sample_to_dir(model, 4, tmp_path, steps=2, batch_size=2, progress=False)  # the same call: resumes
    assert again.drawn == 0
    fresh = sample_to_dir(model, 4, tmp_path / "fresh", steps=2, batch_size=2, progress=False)
    other = json.loads((tmp_path / "fresh" / "manifest.json").read_text())["settings"]["seed"]
    assert other != seed and fresh.drawn == 4


def test_bad_input_fails_before_any_work(tmp_path):
    model, a_file = tiny_unet(), tmp_path / "a_file"
    a_file.write_text("x")
    fresh = tmp_path / "fresh"
    cases = [(dict(n=0), "n must satisfy 1 <= n"), (dict(n=2.5), "n must be an int"),
             (dict(batch_size=0), "batch_size must satisfy 1 <= batch_size"),
             (dict(steps=0), "steps must satisfy 1 <= steps"), (dict(seed="x"), "seed must be an int"),
             (dict(out_dir=a_file), "out_dir .*a_file is a file, not a directory"),
             (dict(out_dir=a_file / "sub"), "out_dir .*sub is not a writable directory"),
             (dict(png_dir=a_file), "png_dir .*a_file is a file"),
             (dict(start=2), "start= is not a sample_to_dir argument"),
             (dict(generator=torch.Generator(), seed=None), "generator= is not a sample_to_dir argument"),
             (dict(x_T=torch.randn(3, 1, 8, 8)), "x_T= is not a sample_to_dir argument"),
             (dict(progress="yes"), "progress must be True or False"),
             (dict(overwrite=1), "overwrite must be True or False"), (dict(out_dir=""), "must be a directory")]
    wrong_types = ({"n": 2.5}, {"seed": "x"})  # a wrong type is a TypeError, as in sample()
    for override, match in cases:
        kw = {**dict(n=3, out_dir=fresh, steps=2, seed=0, progress=False), **override}
        with pytest.raises(TypeError if override in wrong_types else ValueError, match=match):
            sample_to_dir(model, **kw)
        assert not fresh.exists(), override
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        sample_to_dir(lambda x, t: x, 3, fresh, shape=(1, 8, 8), schedule=model.diffusion.make_schedule())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "cat.jpg").write_bytes(b"")
    (busy / "000001.png").write_bytes(b"")  # a name this run writes: fine
    (busy / ".tmp_ab_000002.png").write_bytes(b"")  # a killed run's temp file: removed when the PNGs are written
    with pytest.raises(ValueError, match="holds 1 image.* this run does not write .*cat.jpg.* empty or new"):
        sample_to_dir(model, 3, fresh, png_dir=busy, steps=2, progress=False)
    assert not fresh.exists()
    with pytest.raises(ValueError, match="png_dir: a PNG holds 1, 3 or 4 channels, the images have 2"):
        sample_to_dir(tiny_unet(channels=2), 3, fresh, png_dir=tmp_path / "png2", steps=2, progress=False)
    (busy / "cat.jpg").unlink()
    sample_to_dir(model, 3, fresh, png_dir=busy, steps=2, progress=False)
    assert sorted(os.listdir(busy)) == ["000000.png", "000001.png", "000002.png"]


def test_an_unwritable_out_dir_is_refused(tmp_path):
    model = tiny_unet()
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked
    elif os.path.isdir("/sys/kernel"):
        target = "/sys/kernel/ddpm_fast_test_out"  # root may write anywhere the kernel allows; not in sysfs
    else:
        pytest.skip("running as root without sysfs: no directory refuses writes")
    with pytest.raises(ValueError, match="is not a writable directory"):
        sample_to_dir(model, 2, target, steps=2, progress=False)


# ---- the formats FID tools read ----------------------------------------------------------------------------

def read_like_guided_diffusion(path, batch_size=4):
    """guided-diffusion's evaluations/evaluator.py reads arr_0 this way: the .npy member of the zip, its header,
    then raw C-order batches streamed from the member (it falls back to np.load only for Fortran order or
    object dtypes), each fed as float32 NHWC [0, 255] to an Inception graph that takes 3 channels."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read[version](f)
        assert not fortran and not dtype.hasobject, "the evaluator would not stream this array"
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        batches = []
        while True:
            data = f.read(batch_size * per_image)
            if not data:
                break
            batches.append(np.frombuffer(data, dtype=dtype).reshape(-1, *shape[1:]))
    return dtype, shape, np.concatenate(batches).astype(np.float32)


def test_files_are_in_the_layouts_fid_tools_read(tmp_path, seed):
    model = tiny_unet(channels=3)
    run = sample_to_dir(model, 5, tmp_path / "run", png_dir=tmp_path / "png", steps=2, seed=seed, batch_size=2,
                        progress=False)
    want = expected(model, 5, seed, 2, 2)
    dtype, shape, images = read_like_guided_diffusion(run.path)
    assert dtype == np.uint8 and shape == (5, 8, 8, 3) and np.array_equal(images, want.astype(np.float32))
    # clean-fid: sorted(glob(f"{dir}/**/*.{ext}", recursive=True)), Image.open(f).convert("RGB")
    clean = sorted(glob.glob(os.path.join(tmp_path / "png", "**/*.png"), recursive=True))
    # torch-fidelity: the folder's *.png (not recursive), Image.open(f).convert("RGB")
    fidelity = sorted(os.path.join(tmp_path / "png", f) for f in os.listdir(tmp_path / "png") if f.endswith(".png"))
    assert clean == fidelity and len(clean) == 5
    for i, path in enumerate(clean):
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), want[i])
    gray = sample_to_dir(tiny_unet(), 2, tmp_path / "gray", png_dir=tmp_path / "gray_png", steps=2, seed=seed,
                         progress=False)
    with Image.open(tmp_path / "gray_png" / "000001.png") as im:  # grayscale PNGs: the tools replicate to RGB
        assert np.array_equal(np.asarray(im.convert("RGB")), np.repeat(arr0(gray.path)[1], 3, axis=2))


def test_streamed_npz_is_numpys_own_and_checks_its_parts(tmp_path):
    from ddpm_fast.images import save_uint8_npz
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (9, 3, 5, 3), dtype=np.uint8), rng.integers(0, 10, 9)
    save_uint8_npz(tmp_path / "a.npz", [pixels[:4], pixels[4:8], pixels[8:]], pixels.shape, labels=labels)
    np.savez(tmp_path / "b.npz", arr_0=pixels, arr_1=labels)
    with zipfile.ZipFile(tmp_path / "a.npz") as a, zipfile.ZipFile(tmp_path / "b.npz") as b:
        assert a.namelist() == b.namelist() == ["arr_0.npy", "arr_1.npy"]
        assert all(a.read(m) == b.read(m) for m in a.namelist())  # byte for byte what np.savez writes
    for parts, match in (([pixels[:4]], "the parts hold 4 images, arr_0 needs 9"),
                         ([pixels, pixels[:1]], "does not continue arr_0"),
                         ([pixels.astype(np.int16)], "must be a non-empty uint8"),
                         ([pixels[:, :2]], "does not continue arr_0")):
        with pytest.raises(ValueError, match=match):
            save_uint8_npz(tmp_path / "c.npz", parts, pixels.shape)
    assert not (tmp_path / "c.npz").exists() and len(os.listdir(tmp_path)) == 2  # atomic: no partial file
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        save_uint8_npz(tmp_path / "c.npz", [pixels], pixels.shape, labels=labels[:3])


def test_chunk_reader_names_every_problem(tmp_path):
    pixels = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    path = str(tmp_path / "chunk_000001.safetensors")
    chunkfiles.write_chunk(path, pixels, "d" * 64, 1, 2)
    assert np.array_equal(chunkfiles.read_chunk(path, "d" * 64, 1, (2, 4, 4, 1)), pixels)
    cases = [(path, "e" * 64, 1, (2, 4, 4, 1), "belongs to another run"),
             (path, "d" * 64, 2, (2, 4, 4, 1), "holds chunk 1, not 2"),
             (path, "d" * 64, 1, (3, 4, 4, 1), r"holds pixels torch.uint8 \(2, 4, 4, 1\), expected uint8"),
             (str(tmp_path / "absent"), "d" * 64, 1, (2, 4, 4, 1), "unreadable")]
    for where, digest, k, shape, match in cases:
        with pytest.raises(chunkfiles.BadChunk, match=match):
            chunkfiles.read_chunk(where, digest, k, shape)


# ---- CUDA graphs: every chunk is the same plan, so the runs share cached graphs ---------------------------------




def test_chunks_share_one_captured_graph(tmp_path, seed, monkeypatch):
    """Every chunk is a sample() call with the same batch size and settings: chunks of one size replay ONE
    captured graph (their element offsets live in device memory), so a 50,000-image run captures once per
    chunk size, not once per chunk."""
    model = tiny_unet()
    want = expected(model, 10, seed, memory_format="contiguous")  # eager: no graph backend yet
    backend = ReplayBody()
    monkeypatch.setattr(sampler_graph, "BACKEND", backend)
    sampler_graph.clear_graph_cache()
    try:
        run = sample_to_dir(model, 10, tmp_path, steps=3, seed=seed, batch_size=3, memory_format="contiguous",
                            progress=False)
        assert np.array_equal(arr0(run.path), want)
        assert last_run_info()["modes"] == ["graph-whole"] and last_run_info()["cache_hits"] == 0
        # chunks of 3, 3, 3 and 1 images: one graph for the three full chunks, one for the last
        assert backend.captured == ["whole", "whole"]
        assert sorted(plan.batch for _, plan in sampler_graph._CACHE) == [1, 3]
        again = sample_to_dir(model, 13, tmp_path / "more", steps=3, seed=seed, batch_size=3,
                              memory_format="contiguous", progress=False)
        assert again.drawn == 13 and backend.captured == ["whole", "whole"]  # all from the cache
    finally:
        sampler_graph.clear_graph_cache()
