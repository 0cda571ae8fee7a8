"""`ddpm-fast train`, `eval` and `train-features`, run as a user runs them (a separate process from outside the
checkout): flags derived from TrainConfig, exit code 2 for bad arguments before any work, --resume from the run's
own settings, Ctrl-C / SIGTERM (a test hook sends the signal at a chosen step) stopping with a checkpoint whose
resume is bitwise the uninterrupted run, folder datasets (--image-size, --holdout) and their feature net."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import ddpm_fast_cli, usage_error
from ddpm_fast import checkpoint
from ddpm_fast.cli import build_parser
from ddpm_fast.cli.common import given_values
from ddpm_fast.training.config import TrainConfig

TRAIN = ["train", "--dataset", "digits", "--steps", "2", "--batch-size", "8", "--save-every", "0", "--device",
         "cpu", "--threads", "1"]


def test_every_train_config_field_is_a_flag_and_only_given_flags_count():
    parser = build_parser()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    args = parser.parse_args(["train"])
    assert given_values(args, TrainConfig) == {}  # nothing given: the run's (or the defaults') settings hold
    argv = ["train", "--preset", "ddpm_cifar10", "--batch-size", "32", "--lr", "3e-4", "--amp", "bf16", "--flip",
            "--cuda-graph", "--grad-clip", "0", "--image-size", "16", "--holdout", "0", "--threads", "auto"]
    given = given_values(parser.parse_args(argv), TrainConfig)
    assert given == dict(preset="ddpm_cifar10", batch_size=32, lr=3e-4, amp="bf16", flip=True, cuda_graph=True,
                         grad_clip=0.0, image_size=16, holdout=0.0, threads=None)
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert all("--" + n.replace("_", "-") in help_text for n in names)


@pytest.mark.parametrize("argv", [["--amp", "fp32"], ["--steps", "ten"], ["--preset", "huge"], ["--lr", "fast"],
                                  ["--bogus-flag"], ["--threads", "0"]])
def test_argparse_rejects(argv, capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["train", *argv])
    assert err.value.code == 2 and "error" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "TrainConfig.batch_size=0"),
    (["--ema", "1.5"], "TrainConfig.ema=1.5"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--resume"], "no run to resume"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:999"], "cuda"),
    (["--batch-size", "5000"], "lower --batch-size"),
    (["--holdout", "1.5"], "TrainConfig.holdout=1.5"),
])
def test_bad_values_exit_2_before_work(tmp_path, extra, message):
    done = ddpm_fast_cli(*TRAIN, "--out", "run", *extra, cwd=tmp_path)
    assert usage_error(done, "train", message), done.stderr
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def _ckpt(run):
    tensors, meta = checkpoint.read_training_checkpoint(str(run / "checkpoint.safetensors"))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta["state"]["step"]


def test_interrupt_resume_from_the_run_then_eval(tmp_path):
    """Ctrl-C at step 2 (test hook): exit 130, checkpoint, the exact resume command; that command alone (no
    --dataset, --batch-size, ...) continues the run, which then equals a straight run bitwise; a conflicting flag
    on resume is refused by name; eval scores the result."""
    argv = [*TRAIN[:4], "4", *TRAIN[5:], "--log-every", "1", "--flip"]
    done = ddpm_fast_cli(*argv, "--out", "straight", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dataset digits: 1442 training images, 1x8x8" in done.stderr and "1 thread" in done.stderr
    done = ddpm_fast_cli(*argv, "--out", "run", cwd=tmp_path, env={"DDPM_FAST_TEST_SIGNAL": "2:SIGINT"})
    assert done.returncode == 130, done.stderr
    assert "SIGINT: finishing the current step and writing the checkpoint" in done.stderr
    assert "ddpm-fast train: training stopped by SIGINT after step 2; checkpoint run/checkpoint.safetensors " \
           "written. Resume with: ddpm-fast train --out run --resume" in done.stderr
    assert "Traceback" not in done.stderr and _ckpt(tmp_path / "run")[1] == 2
    assert ddpm_fast_cli("train", "--out", "run", "--resume", "--batch-size", "16", "--seed", "0",
                         cwd=tmp_path).stderr.count("--batch-size 16 but the run has 8") == 1
    done = ddpm_fast_cli("train", "--out", "run", "--resume", cwd=tmp_path)
    assert done.returncode == 0 and "resumed" in done.stderr and "trained 4 steps" in done.stdout, done.stderr
    (a, step_a), (b, step_b) = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "run")
    assert step_a == step_b == 4 and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["elapsed_s"] > rows[1]["elapsed_s"]
    done = ddpm_fast_cli("eval", "--checkpoint", "run", "--dataset", "digits", "--n", "24", "--steps", "4",
                         "--device", "cpu", "--json", "scores.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pure noise" in done.stdout and "FD / held-out floor" in done.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 24 and scores["steps"] == 4 and scores["floor_fd"] < scores["noise_fd"]


@pytest.mark.parametrize("argv, message", [
    (["--n", "1000"], "held-out"),
    (["--n", "1"], "--n must be in [2, 355]"),
    (["--checkpoint", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--dataset", "digits", "--feature-net", "x.safetensors"], "no feature net at x.safetensors"),
])
def test_eval_bad_arguments(tmp_path, argv, message):
    import ddpm_fast
    from ddpm_fast.models import UNet
    path = ddpm_fast.save(UNet.preset("tiny", ch=8, num_groups=4), tmp_path / "m.safetensors")
    base = {"--checkpoint": str(path), "--dataset": "digits", "--device": "cpu"}
    base.update(zip(argv[::2], argv[1::2]))
    done = ddpm_fast_cli("eval", *[x for kv in base.items() for x in kv], cwd=tmp_path)
    assert usage_error(done, "eval", message), done.stderr


def _shapes_folder(root, sizes, classes=("circle", "square")):
    """Coloured shapes of the given sizes, one sub-folder per class (an ImageFolder layout)."""
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        cls = classes[i % len(classes)]
        img = np.zeros((size, size, 3), np.uint8)
        yy, xx = np.mgrid[:size, :size]
        c = size / 2
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2 if cls == "circle" else \
            (abs(yy - c) < size / 3) & (abs(xx - c) < size / 3)
        img[mask] = rng.integers(64, 256, 3)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / cls / f"{i:03d}.png")


def test_folder_dataset_sizes_holdout_and_feature_net(tmp_path):
    _shapes_folder(tmp_path / "mixed", [10] * 32 + [12] * 32)
    _shapes_folder(tmp_path / "ten", [10] * 64)
    base = ["train", "--steps", "1", "--save-every", "0", "--device", "cpu", "--threads", "1"]
    done = ddpm_fast_cli(*base, "--dataset", "folder:mixed", "--out", "r1", cwd=tmp_path)
    assert usage_error(done, "train", "differ in size") and "--image-size" in done.stderr, done.stderr
    done = ddpm_fast_cli(*base, "--dataset", "folder:ten", "--out", "r1", cwd=tmp_path)
    assert usage_error(done, "train", "images are 10x10") and "multiple of 4 for this preset: pass " \
        "--image-size 8 or 12" in done.stderr, done.stderr
    done = ddpm_fast_cli(*base, "--dataset", "folder:ten", "--image-size", "8", "--out", "r1", cwd=tmp_path)
    assert usage_error(done, "train", "58 training images, fewer than one batch of 64"), done.stderr
    done = ddpm_fast_cli(*base, "--dataset", "folder:mixed", "--image-size", "8", "--holdout", "0", "--out", "r2",
                         cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dataset folder:mixed: 64 training images, 3x8x8, 0 held out for eval (--holdout 0)" in done.stderr
    done = ddpm_fast_cli("eval", "--checkpoint", "r2", "--dataset", "folder:mixed", "--device", "cpu",
                         "--holdout", "0.25", cwd=tmp_path)
    assert usage_error(done, "eval", "pass --feature-net FILE") and "ddpm-fast train-features" in done.stderr
    assert "ddpm_fast.sample" not in done.stderr  # refused before sampling
    done = ddpm_fast_cli("train-features", "--dataset", "folder:mixed", "--image-size", "8", "--holdout", "0.25",
                         "--epochs", "2", "--out", "feat.safetensors", cwd=tmp_path)
    assert done.returncode == 0 and "wrote feat.safetensors (test accuracy" in done.stdout, done.stderr
    done = ddpm_fast_cli("eval", "--checkpoint", "r2", "--dataset", "folder:mixed", "--device", "cpu", "--steps",
                         "2", "--holdout", "0.25", "--feature-net", "feat.safetensors", cwd=tmp_path)
    assert done.returncode == 0 and "16 samples" in done.stdout, done.stderr
