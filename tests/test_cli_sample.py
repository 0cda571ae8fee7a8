"""`ddpm-fast sample` end to end on a tiny UNet saved with ddpm_fast.save, and the PNG/npz writers."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast
from ddpm_fast import UNet, checkpoint
from ddpm_fast.cli import main
from ddpm_fast.images import make_grid, save_grid_png, save_npz, to_uint8



pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ddpm_fast.save(UNet.preset("tiny", ch_mult=(1, 2)), str(path))
    return str(path)


def _files(directory):
    return sorted(os.listdir(directory))


def test_cli_writes_png_and_npz_atomically_and_reproducibly(tmp_path, model_file, capsys):
    out, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", model_file, "--n", "5", "--steps", "4", "--seed", "7", "--device", "cpu",
            "--batch-size", "2", "--out", str(out), "--npz", str(npz), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "wrote 5 samples" in printed.out and "seed 7" in printed.out and printed.err == ""
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


def test_default_model_is_used_when_bundled_else_checkpoint_is_required(tmp_path, model_file, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", str(tmp_path / "absent.safetensors"))
    with pytest.raises(SystemExit, match="--checkpoint PATH is needed: this install has no bundled default"):
        main(["sample", "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.png"), "--no-progress"])
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", model_file)
    assert main(["sample", "--n", "2", "--steps", "2", "--device", "cpu", "--seed", "1", "--out",
                 str(tmp_path / "d.png"), "--no-progress"]) == 0
    assert (tmp_path / "d.png").is_file()


def test_cli_errors_are_clear_and_come_before_sampling(tmp_path, model_file, capsys):
    base = ["sample", "--checkpoint", model_file, "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--n", "0"])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is a directory"):
        main(base + ["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        main(["sample", "--checkpoint", str(tmp_path / "nope.safetensors"), "--no-progress"])
    with pytest.raises(SystemExit, match="steps must satisfy 1 <= steps <= 1000"):
        main(base + ["--steps", "1001", "--out", str(tmp_path / "y.png")])
    with pytest.raises(SystemExit, match="eta applies to sampler='ddim' only"):
        main(base + ["--eta", "0.5", "--out", str(tmp_path / "y.png")])
    assert not (tmp_path / "y.png").exists()


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


def test_cli_out_dir_writes_resumes_refuses_and_overwrites(tmp_path, model_file, capsys):
    run = tmp_path / "run"
    argv = ["sample", "--checkpoint", model_file, "-n", "5", "--steps", "3", "--seed", "4", "--device", "cpu",
            "--batch-size", "2", "--out-dir", str(run), "--png-dir", str(tmp_path / "png"), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "5 images in" in printed.out and "5 drawn now" in printed.out and "PNGs in" in printed.out
    assert printed.err == ""
    model = ddpm_fast.load(model_file)
    want = to_uint8(ddpm_fast.sample(model, 5, 3, seed=4, batch_size=2, progress=False))
    np.testing.assert_array_equal(_arr0(run / "samples.npz"), want)
    assert _files(tmp_path / "png") == [f"{i:06d}.png" for i in range(5)]
    assert main(argv) == 0 and "0 drawn now, 5 found on disk" in capsys.readouterr().out
    other = [a if a != "4" else "5" for a in argv]
    with pytest.raises(SystemExit, match="holds a run with other settings: seed: 4 in the directory, 5 now"):
        main(other)
    assert main(other + ["--overwrite"]) == 0 and "5 drawn now" in capsys.readouterr().out
    want = to_uint8(ddpm_fast.sample(model, 5, 3, seed=5, batch_size=2, progress=False))
    np.testing.assert_array_equal(_arr0(run / "samples.npz"), want)


def test_cli_out_dir_errors_come_before_any_work(tmp_path, model_file, monkeypatch, capsys):
    run, a_file = tmp_path / "run", tmp_path / "a_file"
    a_file.write_text("x")
    base = ["sample", "--steps", "2", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit, match="no such file"):
        main(base + ["--checkpoint", str(tmp_path / "absent.safetensors"), "--out-dir", str(run)])
    with pytest.raises(SystemExit, match="a_file is a file, not a directory"):
        main(base + ["--checkpoint", model_file, "--out-dir", str(a_file)])
    for bad in (["-n", "0"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(base + ["--checkpoint", model_file, "--out-dir", str(run)] + bad)
        assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--png-dir and --overwrite go with --out-dir"):
        main(base + ["--checkpoint", model_file, "--png-dir", str(run)])
    with pytest.raises(SystemExit, match="--out and --npz write a grid"):
        main(base + ["--checkpoint", model_file, "--out-dir", str(run), "--npz", str(tmp_path / "s.npz")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="under torchrun, give --out-dir DIR"):
        main(base + ["--checkpoint", model_file])
    assert not run.exists() and _files(tmp_path) == ["a_file"]


def test_cli_reference_writes_the_datasets_pixels(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from ddpm_fast.data import load_dataset
    images = load_dataset("digits", "test").images.permute(0, 2, 3, 1).numpy()
    out = tmp_path / "ref.npz"
    assert main(["reference", "--dataset", "digits", "--split", "test", "--out", str(out)]) == 0
    assert "wrote 355 images (8x8x1, uint8) of digits (test)" in capsys.readouterr().out
    with np.load(out) as data:
        assert data.files == ["arr_0"] and data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_0"], images)
    assert main(["reference", "--dataset", "digits", "--split", "test", "--n", "10", "--out", str(out)]) == 0
    np.testing.assert_array_equal(_arr0(out), images[:10])
    with pytest.raises(SystemExit, match=r"n must be an int in \[1, 355\]"):
        main(["reference", "--dataset", "digits", "--split", "test", "--n", "356", "--out", str(out)])
    with pytest.raises(SystemExit, match="is a directory"):
        main(["reference", "--dataset", "digits", "--out", str(tmp_path)])
