"""Class-conditional training: label dropout at the requested rate, labels that match their images, exact resume,
unconditional runs unchanged on labelled data, and clear errors for datasets without labels."""
import math
import os

import numpy as np
import pytest
import torch

from ddpm_fast import checkpoint
from ddpm_fast.cli import main
from ddpm_fast.data import load_dataset
from ddpm_fast.training import Trainer, TrainConfig
from ddpm_fast.training.step import StepBatches

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _cfg(tmp_path, name="run", **kw):
    base = dict(dataset="digits", preset="tiny", steps=12, batch_size=8, lr=1e-3, warmup=5, ema=0.9,
                save_every=6, log_every=6, out=str(tmp_path / name), device="cpu", flip=True, class_dropout=0.2)
    return TrainConfig(**{**base, **kw})


def _within_sigmas(count, n, p, sigmas=5.0):
    """|count - n p| within ``sigmas`` binomial standard deviations (fails by chance ~1 run in 1.7 million)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.35])
def test_null_label_fraction_and_labels_match_images(seed, p):
    ds = load_dataset("digits", "train", flip=True)
    batches = StepBatches(ds, 0, 1, 64, 1000, seed, 0, 150, class_dropout=p, null_label=10)
    plain = StepBatches(ds, 0, 1, 64, 1000, seed, 0, 150)
    nulls = 0
    for step in range(150):
        x0, t, y = batches[step]
        kept = y != 10
        assert torch.equal(y[kept], ds.labels[batches.indices(step)][kept])  # each label is its image's
        nulls += int((~kept).sum())
        if step < 3:  # the labels draw from their own stream: x0 and t are what an unconditional run draws
            x_plain, t_plain = plain[step]
            assert torch.equal(x0, x_plain) and torch.equal(t, t_plain)
    assert _within_sigmas(nulls, 150 * 64, p), (nulls, 150 * 64 * p)
    again = StepBatches(ds, 0, 1, 64, 1000, seed, 100, 150, class_dropout=p, null_label=10)
    assert torch.equal(again[20][2], batches[120][2])  # a pure function of the step: a resumed run agrees
    zero = StepBatches(ds, 0, 1, 64, 1000, seed, 0, 20, class_dropout=0.0, null_label=10)
    assert all(int((zero[s][2] == 10).sum()) == 0 for s in range(20))


def test_the_model_sees_the_dropped_labels(tmp_path):
    """What the U-Net receives in training: the labels of StepBatches, the null label at the requested rate."""
    trainer = Trainer(_cfg(tmp_path, steps=12, batch_size=32, class_dropout=0.25, save_every=0, log_every=12))
    assert trainer.net.config.num_classes == 10 and trainer.stepper.y is not None
    seen = []
    trainer.net.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    expected = [batch[2] for batch in trainer._batches()]
    trainer.fit()
    assert len(seen) == 12 and all(torch.equal(a, b) for a, b in zip(seen, expected))
    labels = torch.cat(seen)
    assert _within_sigmas(int((labels == 10).sum()), len(labels), 0.25)
    assert set(labels.tolist()) <= set(range(11)) and len(set(labels.tolist())) > 5
    assert trainer.net.class_embedding.weight.grad is not None


def test_resume_is_bitwise_with_labels(tmp_path):
    straight = Trainer(_cfg(tmp_path, "straight"))
    straight.fit()
    Trainer(_cfg(tmp_path, "split", steps=6)).fit()
    resumed = Trainer(_cfg(tmp_path, "split", resume=True))
    assert resumed.step == 6
    resumed.fit()
    a, _ = checkpoint.read_training_checkpoint(os.path.join(straight.run_dir, checkpoint.RUN_CHECKPOINT))
    b, meta = checkpoint.read_training_checkpoint(os.path.join(resumed.run_dir, checkpoint.RUN_CHECKPOINT))
    assert "model.class_embedding.weight" in a and "ema.class_embedding.weight" in a
    assert meta["unet_config"]["num_classes"] == 10
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="class_dropout: checkpoint 0.2, now 0.3"):
        Trainer(_cfg(tmp_path, "split", steps=14, class_dropout=0.3, resume=True))
    with pytest.raises(ValueError, match="class_dropout: checkpoint 0.2, now None"):
        Trainer(_cfg(tmp_path, "split", steps=14, class_dropout=None, resume=True))


def test_labelled_dataset_without_class_dropout_trains_unconditionally(tmp_path):
    trainer = Trainer(_cfg(tmp_path, steps=2, class_dropout=None, save_every=0))
    assert trainer.dataset.labels is not None
    assert trainer.net.config.num_classes is None and trainer.net.class_embedding is None
    assert trainer.stepper.y is None
    assert all(len(batch) == 2 for batch in trainer._batches())
    calls = []
    trainer.net.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    trainer.fit()
    assert calls == [2, 2]  # model(x_t, t): no labels
    with pytest.raises(ValueError, match="conditional model's steps need class labels"):
        trainer.stepper.load_batch(*next(iter(Trainer(_cfg(tmp_path, "other", steps=1))._batches())))


def _npz(tmp_path, labels):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, **({} if labels is None else {"y": labels}))
    return f"npz:{path}"


def test_labelled_npz_and_unlabelled_datasets(tmp_path):
    spec = _npz(tmp_path, np.arange(40) % 3)
    trainer = Trainer(_cfg(tmp_path, dataset=spec, steps=2, save_every=0))
    assert trainer.net.config.num_classes == 3
    trainer.fit()
    bare = _npz(tmp_path, None)
    with pytest.raises(ValueError, match=r"--class-dropout trains a class-conditional model, but dataset "
                                         r"'npz:.*data.npz' has no labels"):
        Trainer(_cfg(tmp_path, "bare", dataset=bare))
    assert not (tmp_path / "bare").exists()


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1"])
def test_bad_class_dropout(tmp_path, value):
    with pytest.raises(ValueError, match=r"TrainConfig.class_dropout=.*must be in \[0, 1\)"):
        _cfg(tmp_path, class_dropout=value).resolved()


def test_cli_flag(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--dataset", "digits", "--class-dropout", "1.5", "--out", str(out)]) == 2
    assert "class_dropout=1.5: must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--class-dropout", "0.1", "--steps", "1", "--batch-size", "8",
                 "--device", "cpu", "--out", str(out)]) == 0
    import ddpm_fast
    assert ddpm_fast.load(str(out)).config.num_classes == 10
