"""`ddpm-fast sample` and `ddpm-fast reference` end to end, each run as a user runs it (a separate process from
outside the checkout), on a tiny UNet saved with ddpm_fast.save; and the image / npz writers."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast
from clirun import ddpm_fast_cli, usage_error
from ddpm_fast import UNet
from ddpm_fast.images import make_grid, save_grid, save_grid_png, save_npz, to_uint8


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _files(directory):
    return sorted(os.listdir(directory))


def test_cli_writes_png_and_npz_atomically_and_reproducibly(tmp_path, model_file):
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    done = ddpm_fast_cli("sample", "--checkpoint", model_file, "--n", "5", "--steps", "4", "--seed", "7", "--device",
                         "cpu", "--batch-size", "2", "--out", out, "--npz", npz, "--no-progress", "--scale", "1",
                         cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 5 samples" in done.stdout and "seed 7" in done.stdout and "1 thread" in done.stdout
    assert done.stderr == ""
    assert _files(tmp_path) == ["grid.png", "s.npz"]  # no temp files left behind
    with Image.open(out) as im:  # 5 images of 8x8: 3 per row, 2 rows, 2 px padding
        assert im.format == "PNG" and im.mode == "L" and im.size == (3 * 10 + 2, 2 * 10 + 2)
        grid = np.asarray(im)
    with np.load(npz) as data:
        images, pixels = data["images"], data["arr_0"]
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.float32 and np.abs(images).max() <= 1
    assert pixels.shape == (5, 8, 8, 1) and pixels.dtype == np.uint8
    want_pixels = np.clip(np.rint((images.astype(np.float64) + 1) * 127.5), 0, 255).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(pixels, want_pixels)
    np.testing.assert_array_equal(grid[2:10, 12:20], pixels[1, :, :, 0])  # second image, first row
    want = ddpm_fast.sample(ddpm_fast.load(model_file), 5, 4, seed=7, batch_size=2, progress=False)
    np.testing.assert_array_equal(images, want.numpy())


def test_cli_image_formats_and_scale(tmp_path, model_file):
    """--out's extension picks the format (JPEG and WebP through Pillow); --scale enlarges each image by nearest
    neighbour (auto: 8x8 -> 4x); an unknown extension is refused before any sampling."""
    base = ["sample", "--checkpoint", model_file, "--n", "4", "--steps", "2", "--seed", "3", "--device", "cpu",
            "--no-progress"]
    done = ddpm_fast_cli(*base, "--out", "g.jpg", "--npz", "g.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "g.jpg") as im, np.load(tmp_path / "g.npz") as data:
        assert im.format == "JPEG" and im.size == (2 * 34 + 2, 2 * 34 + 2)  # auto scale 4: 32 px + 2 px padding
        assert np.abs(np.asarray(im, dtype=float)[2:34, 2:34] -
                      data["arr_0"][0, :, :, 0].repeat(4, 0).repeat(4, 1)).mean() < 4  # JPEG q95 of the same
    done = ddpm_fast_cli(*base, "--out", "g.webp", "--scale", "3", "--npz", "w.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "g.webp") as im, np.load(tmp_path / "w.npz") as data:
        assert im.format == "WEBP" and im.size == (2 * 26 + 2, 2 * 26 + 2)
        block = np.asarray(im.convert("L"))[2:26, 2:26]
        np.testing.assert_array_equal(block, data["arr_0"][0, :, :, 0].repeat(3, 0).repeat(3, 1))  # lossless
    done = ddpm_fast_cli(*base, "--out", "g.gif", cwd=tmp_path)
    assert usage_error(done, "sample", "unknown image extension '.gif'"), done.stderr
    assert "ddpm_fast.sample" not in done.stderr  # refused before the progress bar / any step
    assert not (tmp_path / "g.gif").exists()


def test_save_grid_picks_the_format_and_scales(tmp_path):
    x = torch.rand(3, 4, 5, 5) * 2 - 1
    save_grid(x, tmp_path / "a.png", scale=2)
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "RGBA" and im.size == (2 * 12 + 2, 2 * 12 + 2)
        got = np.asarray(im)
    np.testing.assert_array_equal(got[2:12, 2:12], to_uint8(x)[0].repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="JPEG stores 1 or 3 channels, the images have 4; use .png or .webp"):
        save_grid(x, tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="unknown image extension"):
        save_grid(x[:, :3], tmp_path / "a.tif")
    with pytest.raises(ValueError, match="scale must be an int >= 1"):
        save_grid(x, tmp_path / "b.png", scale=0)
    assert _files(tmp_path) == ["a.png"]


def test_python_dash_m_runs_the_same_command(tmp_path, model_file):
    """`python -m ddpm_fast` is the CLI's main(): two fresh processes, one per entry, write bitwise the same images
    (same environment, so the same thread count and kernel choices). Against this process the images agree to the
    U-Net's rounding only: another process may pick other oneDNN kernels and round differently (~1e-6)."""
    args = ["sample", "--checkpoint", model_file, "--n", "3", "--steps", "3", "--seed", "11", "--device", "cpu",
            "--no-progress"]
    entries = {"dash_m": [sys.executable, "-m", "ddpm_fast"],
               "main": [sys.executable, "-c", "import sys; from ddpm_fast.cli import main; sys.exit(main())"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    images = {}
    for name, entry in entries.items():
        npz = tmp_path / f"{name}.npz"
        # cwd outside the checkout: from the repo root, ./ddpm_fast (no _C in a fresh clone) would shadow the install
        done = subprocess.run(entry + args + ["--out", str(tmp_path / f"{name}.png"), "--npz", str(npz)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        with np.load(npz) as data:
            images[name] = data["images"]
    np.testing.assert_array_equal(images["dash_m"], images["main"])
    want = ddpm_fast.sample(ddpm_fast.load(model_file), 3, 3, seed=11, progress=False)
    np.testing.assert_allclose(images["dash_m"], want.numpy(), rtol=0, atol=1e-4)


def test_default_model_is_used_when_bundled_else_checkpoint_is_required(tmp_path, model_file):
    absent = f"import sys\nfrom ddpm_fast import checkpoint\ncheckpoint.DEFAULT_MODEL = {str(tmp_path / 'no.st')!r}"
    done = ddpm_fast_cli("sample", "--n", "2", "--steps", "2", "--out", "x.png", "--no-progress", cwd=tmp_path,
                         code=absent)
    assert usage_error(done, "sample", "--checkpoint PATH is needed: this install has no bundled default"), \
        done.stderr
    bundled = f"import sys\nfrom ddpm_fast import checkpoint\ncheckpoint.DEFAULT_MODEL = {model_file!r}"
    done = ddpm_fast_cli("sample", "--n", "2", "--steps", "2", "--device", "cpu", "--seed", "1", "--out", "d.png",
                         "--no-progress", cwd=tmp_path, code=bundled)
    assert done.returncode == 0 and (tmp_path / "d.png").is_file(), done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "must be >= 1"),
    (["--out", "."], "is a directory"),
    (["--checkpoint", "nope.safetensors"], "no such file"),
    (["--steps", "1001"], "steps must satisfy 1 <= steps <= 1000"),
    (["--eta", "0.5"], "eta applies to sampler='ddim' only"),
    (["--threads", "0"], "must be >= 1"),
])
def test_cli_usage_errors_exit_2_before_sampling(tmp_path, model_file, argv, message):
    done = ddpm_fast_cli("sample", "--checkpoint", model_file, "--device", "cpu", "--no-progress", "--out", "y.png",
                         *argv, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "ddpm-fast sample: error:" in done.stderr, \
        done.stderr
    assert _files(tmp_path) == []


def test_cli_runtime_failure_exits_1(tmp_path):
    """A model whose outputs are NaN: the work fails (not the usage), exit code 1, one line, no picture."""
    model = UNet.preset("tiny", ch_mult=(1, 2))
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    ddpm_fast.save(model, tmp_path / "nan.safetensors")
    done = ddpm_fast_cli("sample", "--checkpoint", "nan.safetensors", "--n", "2", "--steps", "2", "--device", "cpu",
                         "--no-progress", cwd=tmp_path)
    assert done.returncode == 1 and "ddpm-fast sample: error: sampling produced non-finite values" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "samples.png").exists()


# ---- the writers ------------------------------------------------------------------------------------------

def test_to_uint8_and_grid_layout():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 3)
    np.testing.assert_array_equal(to_uint8(x)[0, :, :, 0], [[0, 0, 128], [191, 255, 255]])
    imgs = np.arange(7 * 2 * 3 * 3, dtype=np.uint8).reshape(7, 2, 3, 3)
    grid = make_grid(imgs, nrow=4, padding=1)
    assert grid.shape == (2 * 3 + 1, 4 * 4 + 1, 3)
    np.testing.assert_array_equal(grid[4:6, 5:8], imgs[5])  # row 1, column 1
    assert grid[:, 0].max() == 0 and grid[0].max() == 0  # black padding


def test_writers_check_inputs_and_leave_old_files_intact_on_failure(tmp_path, monkeypatch):
    rgb = torch.rand(4, 3, 5, 5) * 2 - 1
    path = tmp_path / "g.png"
    save_grid_png(rgb, path)
    with Image.open(path) as im:
        assert im.mode == "RGB"
    before = path.read_bytes()
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        save_grid_png(torch.zeros(2, 2, 4, 4), path)
    with pytest.raises(ValueError, match="NaN or inf"):
        save_npz(torch.full((1, 1, 2, 2), float("nan")), tmp_path / "n.npz")
    with pytest.raises(ValueError, match=r"float tensor \(N, C, H, W\)"):
        save_npz(torch.zeros(3, 4), tmp_path / "n.npz")

    def broken(self, fp, format=None, **kw):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_grid_png(rgb.flip(0), path)
    assert path.read_bytes() == before and _files(tmp_path) == ["g.png"]


# ---- --out-dir: an evaluation run (ddpm_fast.sample_to_dir) ----------------------------------------------

def _arr0(path):
    with np.load(path) as data:
        return data["arr_0"]


def test_cli_out_dir_writes_resumes_refuses_and_overwrites(tmp_path, model_file):
    run = tmp_path / "run"
    argv = ["sample", "--checkpoint", model_file, "-n", "5", "--steps", "3", "--seed", "4", "--device", "cpu",
            "--batch-size", "2", "--out-dir", run, "--png-dir", tmp_path / "png", "--no-progress"]
    done = ddpm_fast_cli(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "5 images in" in done.stdout and "5 drawn now" in done.stdout and "PNGs in" in done.stdout
    assert done.stderr == ""
    model = ddpm_fast.load(model_file)
    want = to_uint8(ddpm_fast.sample(model, 5, 3, seed=4, batch_size=2, progress=False))
    np.testing.assert_array_equal(_arr0(run / "samples.npz"), want)
    assert _files(tmp_path / "png") == [f"{i:06d}.png" for i in range(5)]
    done = ddpm_fast_cli(*argv, cwd=tmp_path)
    assert done.returncode == 0 and "0 drawn now, 5 found on disk" in done.stdout
    other = [a if a != "4" else "5" for a in argv]
    done = ddpm_fast_cli(*other, cwd=tmp_path)
    assert usage_error(done, "sample", "holds a run with other settings: seed: 4 in the directory, 5 now"), \
        done.stderr
    done = ddpm_fast_cli(*other, "--overwrite", cwd=tmp_path)
    assert done.returncode == 0 and "5 drawn now" in done.stdout
    want = to_uint8(ddpm_fast.sample(model, 5, 3, seed=5, batch_size=2, progress=False))
    np.testing.assert_array_equal(_arr0(run / "samples.npz"), want)


@pytest.mark.parametrize("argv, message, env", [
    (["--checkpoint", "absent.safetensors", "--out-dir", "run"], "no such file", {}),
    (["--out-dir", "a_file"], "a_file is a file, not a directory", {}),
    (["--out-dir", "run", "-n", "0"], "must be >= 1", {}),
    (["--out-dir", "run", "--batch-size", "0"], "must be >= 1", {}),
    (["--png-dir", "run"], "--png-dir and --overwrite go with --out-dir", {}),
    (["--out-dir", "run", "--npz", "s.npz"], "--out and --npz write a grid", {}),
    ([], "under torchrun, give --out-dir DIR", {"WORLD_SIZE": "2"}),
])
def test_cli_out_dir_errors_come_before_any_work(tmp_path, model_file, argv, message, env):
    (tmp_path / "a_file").write_text("x")
    done = ddpm_fast_cli("sample", "--steps", "2", "--device", "cpu", "--no-progress", "--checkpoint", model_file,
                         *argv, cwd=tmp_path, env=env)
    assert usage_error(done, "sample", message), done.stderr
    assert _files(tmp_path) == ["a_file"]


def test_cli_reference_writes_the_datasets_pixels(tmp_path):
    pytest.importorskip("sklearn")
    from ddpm_fast.data import load_dataset
    images = load_dataset("digits", "test").images.permute(0, 2, 3, 1).numpy()
    out = tmp_path / "ref.npz"
    done = ddpm_fast_cli("reference", "--dataset", "digits", "--split", "test", "--out", out, cwd=tmp_path)
    assert done.returncode == 0 and "wrote 355 images (8x8x1, uint8) of digits (test)" in done.stdout
    with np.load(out) as data:
        assert data.files == ["arr_0"] and data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_0"], images)
    done = ddpm_fast_cli("reference", "--dataset", "digits", "--split", "test", "--n", "10", "--out", out,
                         cwd=tmp_path)
    assert done.returncode == 0
    np.testing.assert_array_equal(_arr0(out), images[:10])
    done = ddpm_fast_cli("reference", "--dataset", "digits", "--split", "test", "--n", "356", "--out", out,
                         cwd=tmp_path)
    assert usage_error(done, "reference", "n must be an int in [1, 355]"), done.stderr
    done = ddpm_fast_cli("reference", "--dataset", "digits", "--out", tmp_path, cwd=tmp_path)
    assert usage_error(done, "reference", "is a directory"), done.stderr


def test_cli_compile_runs_the_compiled_model(tmp_path, model_file):
    """--compile: the grid and the --out-dir run go through sample(compile=True) (dynamo's "eager" backend here,
    so the images equal the uncompiled ones bitwise; a sentence in the output says it compiled)."""
    prologue = ("import sys\nfrom ddpm_fast import compiler\nfrom ddpm_fast.ops import group_norm_silu as gns\n"
                "compiler.BACKEND = 'eager'\ngns.COMPILED_CPU_INFERENCE = 'op'")  # the uncompiled kernels: bitwise
    common = ("--checkpoint", model_file, "--n", "3", "--steps", "3", "--seed", "2", "--device", "cpu",
              "--no-progress")
    done = ddpm_fast_cli("sample", *common, "--compile", "--out", tmp_path / "c.png", "--npz", tmp_path / "c.npz",
                         cwd=tmp_path, code=prologue)
    assert done.returncode == 0, done.stderr
    assert "compiled" in done.stdout
    with np.load(tmp_path / "c.npz") as data:
        got = data["images"]
    want = ddpm_fast.sample(ddpm_fast.load(model_file), 3, 3, seed=2, progress=False)
    np.testing.assert_array_equal(got, want.numpy())
    done = ddpm_fast_cli("sample", *common, "--compile", "--out-dir", tmp_path / "run", cwd=tmp_path, code=prologue)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "run" / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], to_uint8(want))
