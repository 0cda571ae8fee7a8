"""Stopping and resuming: SIGINT / SIGTERM stop after the current step with a checkpoint and a resume command, and
the resumed run equals an uninterrupted one bitwise (CPU); --resume takes the run's own settings; elapsed_s is
cumulative over sessions; the per-run thread count and the start-of-run summary."""
import json
import os
import signal

import pytest
import torch

import ddpm_fast
from ddpm_fast import checkpoint
from ddpm_fast.training import Trainer, TrainConfig
from ddpm_fast.training.log import read_metrics
from ddpm_fast.training.resume import resume_config
from ddpm_fast.training.signals import TEST_HOOK, TrainingInterrupted


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _cfg(tmp_path, name="run", **kw):
    base = dict(dataset="digits", preset="tiny", steps=8, batch_size=8, lr=1e-3, warmup=2, ema=0.9,
                save_every=0, log_every=3, out=str(tmp_path / name), device="cpu", flip=True, threads=1)
    return TrainConfig(**{**base, **kw})


def _state(run_dir):
    tensors, meta = checkpoint.read_training_checkpoint(os.path.join(run_dir, checkpoint.RUN_CHECKPOINT))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta["state"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_after_the_step_and_the_resumed_run_is_bitwise_the_straight_one(tmp_path, monkeypatch, sig):
    straight = Trainer(_cfg(tmp_path, "straight"))
    straight.fit()
    before = signal.getsignal(sig)
    monkeypatch.setenv(TEST_HOOK, f"5:{sig.name}")
    stopped = Trainer(_cfg(tmp_path, "split"))
    with pytest.raises(TrainingInterrupted) as caught:
        stopped.fit()
    monkeypatch.delenv(TEST_HOOK)
    stop = caught.value
    assert isinstance(stop, KeyboardInterrupt) and stop.signum == sig and stop.exit_code == 128 + sig
    assert stop.step == stopped.step == 5 and signal.getsignal(sig) is before  # handlers restored
    run = str(tmp_path / "split")
    assert stop.checkpoint == os.path.join(run, checkpoint.RUN_CHECKPOINT)
    assert stop.resume_command == f"ddpm-fast train --out {run} --resume"
    assert f"stopped by {sig.name} after step 5" in str(stop)
    assert _state(run)[1]["step"] == 5 and not os.path.exists(os.path.join(run, "model.safetensors"))
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [3, 5]  # the stop step is logged too
    ddpm_fast.train(out=run, resume=True)  # the run's own settings
    a, sa = _state(straight.run_dir)
    b, sb = _state(run)
    assert sa["step"] == sb["step"] == 8 and sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: model, EMA, AdamW moments
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [3, 5, 6, 8]
    first, resumed = rows[1], rows[2]
    assert resumed["elapsed_s"] > first["elapsed_s"] and resumed["session_s"] < resumed["elapsed_s"]
    assert resumed["elapsed_s"] == pytest.approx(first["elapsed_s"] + resumed["session_s"])


def test_a_signal_at_the_last_step_finishes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_HOOK, "3:SIGINT")
    path = Trainer(_cfg(tmp_path, steps=3)).fit()
    assert os.path.isfile(path)


def test_test_hook_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_HOOK, "three:SIGINT")
    with pytest.raises(ValueError, match="expected STEP:SIGNAME"):
        Trainer(_cfg(tmp_path, steps=2)).fit()


def test_resume_takes_the_runs_settings_and_refuses_conflicts_by_name(tmp_path):
    Trainer(_cfg(tmp_path, steps=2, holdout=0.0)).fit()
    run = str(tmp_path / "run")
    cfg = resume_config(run, {"steps": 4, "log_every": 1, "threads": 2})
    assert (cfg.steps, cfg.log_every, cfg.threads, cfg.resume, cfg.batch_size, cfg.flip) == (4, 1, 2, True, 8, True)
    assert cfg.lr == 1e-3 and cfg.warmup == 2 and cfg.holdout == 0.0
    assert resume_config(run, {"batch_size": 8}).batch_size == 8  # the same value is not a conflict
    with pytest.raises(ValueError, match=r"batch_size 16 but the run has 8; seed 3 but the run has 0\. Drop those"):
        resume_config(run, {"batch_size": 16, "seed": 3, "steps": 9})
    with pytest.raises(ValueError, match="--dataset 'fashion-mnist' but the run has 'digits'"):
        resume_config(run, {"dataset": "fashion-mnist"}, name=lambda f: "--" + f.replace("_", "-"))
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        resume_config(str(tmp_path / "none"), {})
    os.remove(os.path.join(run, "config.json"))  # a run without config.json: the checkpoint's own record
    assert resume_config(run, {}).batch_size == 8


def test_threads_auto_and_the_start_summary(tmp_path):
    lines = []
    trainer = Trainer(_cfg(tmp_path, threads=None, steps=1), log=lines.append)
    assert trainer.threads == 1  # the tiny preset on 8x8 at batch 8 is small work
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer.fit()
        assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(before)
    text = "\n".join(lines)
    assert "dataset digits: 1442 training images, 1x8x8" in text
    assert "model: tiny preset U-Net, 0.69 M parameters" in text and "1 thread (auto), float32" in text
    big = Trainer(_cfg(tmp_path, "big", batch_size=512, threads=None, steps=1), log=lines.append)
    assert big.threads is None  # 0.69 M parameters x 64 pixels x 512 > SMALL_WORK: torch's setting stays


def test_run_config_json_records_the_new_fields(tmp_path):
    Trainer(_cfg(tmp_path, steps=1)).fit()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["holdout"] == 0.1 and saved["image_size"] is None and saved["threads"] == 1
