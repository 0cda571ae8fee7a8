"""`ddpm-fast train` and `ddpm-fast eval`: flags derived from TrainConfig, bad arguments refused with a clear
message before any work, a tiny run end to end."""
import dataclasses
import json

import pytest
import torch

from ddpm_fast.cli import build_parser, main
from ddpm_fast.training.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _train(tmp_path, *extra):
    return main(["train", "--dataset", "digits", "--steps", "2", "--batch-size", "8", "--save-every", "0",
                 "--device", "cpu", "--out", str(tmp_path / "run"), *extra])


def test_every_train_config_field_is_a_flag():
    args = build_parser().parse_args(["train"])
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(vars(args))
    assert TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}) == TrainConfig()
    args = build_parser().parse_args(["train", "--preset", "ddpm_cifar10", "--batch-size", "32", "--lr", "3e-4",
                                      "--amp", "bf16", "--flip", "--cuda-graph", "--grad-clip", "0"])
    assert (args.preset, args.batch_size, args.lr, args.amp, args.flip, args.cuda_graph, args.grad_clip) == \
        ("ddpm_cifar10", 32, 3e-4, "bf16", True, True, 0.0)


@pytest.mark.parametrize("argv", [["--amp", "fp32"], ["--steps", "ten"], ["--preset", "huge"],
                                  ["--lr", "fast"], ["--bogus-flag"]])
def test_argparse_rejects(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", *argv])
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "TrainConfig.batch_size=0"),
    (["--ema", "1.5"], "TrainConfig.ema=1.5"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--resume"], "no checkpoint to resume"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:999"], "cuda"),
    (["--batch-size", "5000"], "lower --batch-size"),
])
def test_bad_values_exit_2_before_work(tmp_path, capsys, extra, message):
    assert _train(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast train: error:") and message.lower() in err.lower(), err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_train_then_resume_then_eval(tmp_path, capsys):
    assert _train(tmp_path, "--log-every", "1") == 0
    out = capsys.readouterr().out
    model = tmp_path / "run" / "model.safetensors"
    assert str(model) in out and model.is_file()
    assert _train(tmp_path) == 2  # the run exists: refuse to overwrite without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--steps", "3", "--batch-size", "8", "--save-every", "0",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--log-every", "1", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    report = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--dataset", "digits", "--n", "24", "--steps",
                 "4", "--device", "cpu", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "pure noise" in text and "FD / held-out floor" in text and "random-subset floor" in text
    scores = json.loads(report.read_text())
    assert scores["n"] == 24 and scores["steps"] == 4
    assert scores["floor_fd"] < scores["noise_fd"]


@pytest.mark.parametrize("argv, message", [
    (["--n", "1000"], "held-out"),
    (["--n", "1"], "--n must be in [2, 355]"),
    (["--checkpoint", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    (["--dataset", "nope"], "unknown dataset"),
])
def test_eval_bad_arguments(tmp_path, capsys, argv, message):
    from ddpm_fast.models import UNet
    import ddpm_fast
    path = ddpm_fast.save(UNet.preset("tiny", ch=8, num_groups=4), tmp_path / "m.safetensors")
    base = {"--checkpoint": str(path), "--dataset": "digits", "--device": "cpu"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert main(["eval", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err


def test_eval_requires_dataset(capsys):
    with pytest.raises(SystemExit):
        main(["eval"])
    assert "--dataset" in capsys.readouterr().err
