"""--class and --guidance of `ddpm-fast sample` (a grid row per class, the labels in --npz and --out-dir's
samples.npz) and `ddpm-fast eval`, on the bundled class-conditional model; usage errors before any sampling."""
import json

import numpy as np
import pytest
from PIL import Image

import ddpm_fast
from clirun import ddpm_fast_cli, usage_error
from ddpm_fast.cli import main
from ddpm_fast.sampling.conditioning import DEFAULT_GUIDANCE_SCALE

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_the_quick_start_command_draws_the_class(tmp_path):
    """`ddpm-fast sample --checkpoint digits-cond --class 7 --guidance 2` as a user runs it: the images are
    ddpm_fast.sample's with labels 7 and w = 2, the labels are arr_1 of --npz."""
    done = ddpm_fast_cli("sample", "--checkpoint", "digits-cond", "--class", "7", "--guidance", "2", "-n", "4",
                         "--steps", "3", "--seed", "5", "--device", "cpu", "--npz", "s.npz", "--no-progress",
                         cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 4 samples" in done.stdout and "class 7, guidance 2" in done.stdout
    want = ddpm_fast.sample(ddpm_fast.load("digits-cond"), 4, 3, seed=5, labels=7, guidance_scale=2.0,
                            progress=False)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_1"].tolist() == [7] * 4
        np.testing.assert_array_equal(f["images"], want.numpy())


def test_a_list_of_classes_makes_one_grid_row_each(tmp_path, capsys):
    out, npz = tmp_path / "g.png", tmp_path / "g.npz"
    assert main(["sample", "--checkpoint", "digits-cond", "--class", "3,0,9", "-n", "6", "--steps", "2", "--seed",
                 "1", "--device", "cpu", "--scale", "1", "--out", str(out), "--npz", str(npz), "--no-progress"]) == 0
    assert f"classes 0,3,9, guidance {DEFAULT_GUIDANCE_SCALE:g}" in capsys.readouterr().out
    with Image.open(out) as im:  # 3 rows of 2 images of 8x8, 2 px padding
        assert im.size == (2 * 10 + 2, 3 * 10 + 2)
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == [3, 3, 0, 0, 9, 9]
    out_all = tmp_path / "all.png"
    assert main(["sample", "--checkpoint", "digits-cond", "--class", "all", "--guidance", "0", "--steps", "1",
                 "--device", "cpu", "--scale", "1", "--out", str(out_all), "--no-progress"]) == 0
    with Image.open(out_all) as im:  # default n: 8 per class, one row per class
        assert im.size == (8 * 10 + 2, 10 * 10 + 2)


def test_out_dir_writes_the_labels_as_arr_1(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sample", "--checkpoint", "digits-cond", "--class", "1,2", "-n", "5", "--steps", "2", "--seed",
                 "0", "--device", "cpu", "--out-dir", str(run), "--batch-size", "2", "--no-progress"]) == 0
    with np.load(run / "samples.npz") as f:
        assert f["arr_0"].shape == (5, 8, 8, 1) and f["arr_1"].tolist() == [1, 1, 1, 2, 2]
    settings = json.loads((run / "manifest.json").read_text())["settings"]
    assert settings["guidance_scale"] == DEFAULT_GUIDANCE_SCALE and settings["labels"]["shape"] == [5]


def test_eval_scores_guided_samples(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", "digits-cond", "--dataset", "digits", "--n", "20", "--steps", "2",
                 "--class", "all", "--guidance", "3", "--device", "cpu", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["classes"] == list(range(10)) and scores["guidance_scale"] == 3.0
    assert "classes 0-9 in equal blocks, guidance 3" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "2"], "--guidance needs --class"),
    (["--class", "12"], "--class 12: the model's classes are 0..9"),
    (["--class", "1,2,3", "-n", "7"], "-n 7 is not a multiple of the 3 classes"),
    (["--class", "7", "--guidance", "nan"], "guidance_scale must be finite"),
    (["--class", "seven"], "expected a class, a comma-separated list of classes or 'all'"),
    (["--class", "-1"], "classes are >= 0"),
])
def test_usage_errors_before_sampling(tmp_path, flags, message):
    done = ddpm_fast_cli("sample", "--checkpoint", "digits-cond", "--steps", "2", "--device", "cpu", *flags,
                         cwd=tmp_path)
    assert usage_error(done, "sample", message), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_class_needs_a_class_conditional_model(tmp_path, model_file, capsys):
    for command in (["sample", "--out", str(tmp_path / "x.png")], ["eval", "--dataset", "digits"]):
        assert main([*command, "--checkpoint", model_file, "--class", "1", "--steps", "2", "--device",
                     "cpu"]) == 2
        assert "--class needs a class-conditional model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
