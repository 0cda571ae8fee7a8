"""Training: the loss falls, resume is exact (bitwise on the CPU), a killed save keeps the last checkpoint,
per-step randomness is reproducible, bad settings are refused before any work."""
import dataclasses
import json
import os

import pytest
import torch

import ddpm_fast
from ddpm_fast import checkpoint
from ddpm_fast.training import Trainer, TrainConfig
from ddpm_fast.training.log import read_metrics
from ddpm_fast.training.step import EMA, StepBatches, ema_decay, mix, warmup_lr


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
try:
    import matplotlib  # noqa: F401  (optional: without it a run writes no loss.png, and says so)
    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def _cfg(tmp_path, name="run", **kw):
    base = dict(dataset="digits", preset="tiny", steps=20, batch_size=8, lr=1e-3, warmup=5, ema=0.9,
                save_every=10, log_every=5, out=str(tmp_path / name), device="cpu", flip=True)
    return TrainConfig(**{**base, **kw})


def _fixed_batch_loss(trainer, seed):
    """The loss of the (non-EMA) model on one fixed batch, timesteps and noise, in eval mode (no dropout)."""
    from ddpm_fast.diffusion import training_losses
    from ddpm_fast.ops.q_sample import q_sample
    g = torch.Generator().manual_seed(seed)
    x0 = trainer.dataset.batch(torch.randint(len(trainer.dataset), (128,), generator=g))
    t = torch.randint(0, 1000, (128,), generator=g)
    x_t, eps = q_sample(trainer.tables, x0, t, seed=seed)
    with torch.no_grad():
        out = trainer.net.eval()(x_t, t)
    return training_losses(trainer.tables, out, x0, x_t, t, eps, variance="fixed_large")["loss"].mean().item()


def test_loss_decreases(tmp_path, seed):
    trainer = Trainer(_cfg(tmp_path, steps=30, batch_size=16, warmup=5, save_every=0, log_every=10))
    before = _fixed_batch_loss(trainer, seed)
    trainer.net.train()
    trainer.fit()
    after = _fixed_batch_loss(trainer, seed)
    assert after < 0.6 * before, (before, after)
    rows = read_metrics(os.path.join(trainer.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(r["loss"] > 0 and r["steps_per_s"] > 0 for r in rows)
    files = {"model.safetensors", "checkpoint.safetensors", "config.json"} | ({"loss.png"} if HAS_MPL else set())
    assert files <= set(os.listdir(trainer.run_dir))


def _checkpoint_tensors(run_dir):
    tensors, meta = checkpoint.read_training_checkpoint(os.path.join(run_dir, checkpoint.RUN_CHECKPOINT))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta["state"]


def test_resume_is_exact(tmp_path):
    straight = Trainer(_cfg(tmp_path, "straight"))
    straight.fit()
    Trainer(_cfg(tmp_path, "split", steps=10)).fit()
    resumed = Trainer(_cfg(tmp_path, "split", resume=True))
    assert resumed.step == 10
    resumed.fit()
    a, state_a = _checkpoint_tensors(straight.run_dir)
    b, state_b = _checkpoint_tensors(resumed.run_dir)
    assert state_a["step"] == state_b["step"] == 20
    assert sorted(a) == sorted(b) and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: model, EMA and AdamW moments
    rows = read_metrics(os.path.join(resumed.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    # the model file is the EMA weights of the checkpoint
    model = ddpm_fast.load(resumed.run_dir)
    assert all(torch.equal(v, a[f"ema.{k}"]) for k, v in model.state_dict().items())


def test_killed_save_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=10, save_every=5, log_every=1)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if dst.endswith(checkpoint.RUN_CHECKPOINT) and len(calls) > 2:  # config.json, checkpoint@5, then crash
            raise OSError("simulated kill between write and rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated kill"):
        Trainer(cfg).fit()
    monkeypatch.undo()
    run = tmp_path / "run"
    assert not [p for p in os.listdir(run) if p.startswith(".tmp_")]
    _, state = _checkpoint_tensors(run)
    assert state["step"] == 5
    assert len(read_metrics(run / "metrics.jsonl")) == 10  # logged past the checkpoint before the "kill"
    resumed = Trainer(_cfg(tmp_path, steps=10, save_every=5, log_every=1, resume=True))
    resumed.fit()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 11))
    Trainer(_cfg(tmp_path, "straight", steps=10, save_every=5, log_every=1)).fit()
    a, _ = _checkpoint_tensors(tmp_path / "straight")
    b, _ = _checkpoint_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_guards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer(_cfg(tmp_path, resume=True))
    Trainer(_cfg(tmp_path, steps=2)).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(tmp_path, steps=4))
    with pytest.raises(ValueError, match="batch_size: checkpoint 8, now 16"):
        Trainer(_cfg(tmp_path, steps=4, batch_size=16, resume=True))
    with pytest.raises(ValueError, match="seed: checkpoint 0, now 1"):
        Trainer(_cfg(tmp_path, steps=4, seed=1, resume=True))


def test_step_batches_are_a_function_of_the_step(seed):
    from ddpm_fast.data import load_dataset
    ds = load_dataset("digits", "train", flip=True)
    a = StepBatches(ds, 0, 1, 16, 1000, seed, 0, 200)
    b = StepBatches(ds, 0, 1, 16, 1000, seed, 150, 200)  # a resumed run starting at step 150
    for step in (150, 151, 199):
        xa, ta = a[step]
        xb, tb = b[step - 150]
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    # one epoch visits every kept image once; different epochs shuffle differently
    per_epoch = a.steps_per_epoch
    seen = torch.cat([a.indices(s) for s in range(per_epoch)])
    assert per_epoch == len(ds) // 16 and len(seen.unique()) == len(seen)
    assert not torch.equal(a.indices(0), a.indices(per_epoch))
    # workers produce the same batches (all randomness is explicit)
    loader = torch.utils.data.DataLoader(StepBatches(ds, 0, 1, 16, 1000, seed, 0, 3), batch_size=None,
                                         num_workers=2)
    for i, (x, t) in enumerate(loader):
        assert torch.equal(x, a[i][0]) and torch.equal(t, a[i][1])


def test_step_batches_shard_over_ranks():
    from ddpm_fast.data import load_dataset
    ds = load_dataset("digits", "train")
    r0, r1 = (StepBatches(ds, r, 2, 16, 1000, 3, 0, 10) for r in (0, 1))
    both = torch.cat([r0.indices(0), r1.indices(0)])
    assert len(both.unique()) == 32  # the two ranks see different images
    with pytest.raises(ValueError, match="lower --batch-size"):
        StepBatches(ds, 0, 1, 2000, 1000, 0, 0, 1)


def test_ema_update_and_schedules(seed):
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(torch.randn_like(p))
    ema.update(torch.tensor(0.25))
    for s0, s, live in zip(start, ema.shadow, lin.state_dict().values()):
        torch.testing.assert_close(s, 0.75 * s0 + 0.25 * live)
    assert ema_decay(0.999, 0) == 0.1 and ema_decay(0.999, 10 ** 6) == 0.999
    assert warmup_lr(1e-3, 10, 0) == pytest.approx(1e-4) and warmup_lr(1e-3, 10, 50) == 1e-3
    assert warmup_lr(1e-3, 0, 0) == 1e-3
    seeds = {mix(seed, r, s) for r in range(3) for s in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2 ** 62 for x in seeds)


def _first_batch_outputs(trainer, model):
    """(model outputs (float32), per-sample losses) of the trainer's first step (its batch, noise and dropout)
    under its autocast setting."""
    from ddpm_fast.diffusion import training_losses
    from ddpm_fast.ops.q_sample import q_sample
    x0, t = next(iter(trainer._batches()))
    st = trainer.stepper
    trainer._prepare_step()
    st.load_batch(x0, t)
    with torch.no_grad(), st._autocast():
        x_t, eps = q_sample(st.tables, st.x0, st.t, seed=st.seed)
        out = model.train()(x_t, st.t).float()
    losses = training_losses(st.tables, out, st.x0, x_t, st.t, eps, variance=trainer.net.diffusion.variance)
    return out, losses["loss"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_follow_the_error_rule(tmp_path, amp):
    """Under autocast the fused U-Net's outputs on the first batch obey the project's rule against the float32
    run: |amp - fp32| <= 2 |naive - fp32| + atol, naive = the plain-PyTorch U-Net (fused=False, same weights)
    under the same autocast; the first logged loss is that batch's AMP loss; the steps run (GradScaler for fp16)."""
    from ddpm_fast.models import UNet
    fp32 = Trainer(_cfg(tmp_path, "fp32", steps=3))
    ref_out, _ = _first_batch_outputs(fp32, fp32.net)
    trainer = Trainer(_cfg(tmp_path, steps=3, amp=amp, log_every=1, save_every=0))
    plain = UNet(dataclasses.replace(trainer.net.config, fused=False), trainer.net.diffusion)
    plain.load_state_dict(trainer.net.state_dict())
    out, losses = _first_batch_outputs(trainer, trainer.net)
    naive, _ = _first_batch_outputs(trainer, plain)
    err, naive_err = (out - ref_out).abs().max().item(), (naive - ref_out).abs().max().item()
    assert 0 < err <= 2 * naive_err + 1e-6, (err, naive_err)
    trainer.fit()
    logged = [r["loss"] for r in read_metrics(os.path.join(trainer.run_dir, "metrics.jsonl"))]
    assert len(logged) == 3 and logged[0] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert (trainer.scaler is not None) == (amp == "fp16")
    state = json.loads(json.dumps(_checkpoint_tensors(trainer.run_dir)[1]))
    assert (state["scaler"] is not None) == (amp == "fp16")


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps"), ("batch_size", -1, "batch_size"), ("lr", 0.0, "lr"), ("ema", 1.0, "ema"),
    ("grad_clip", -1.0, "grad_clip"), ("amp", "fp8", "amp"), ("warmup", -5, "warmup"),
    ("preset", "huge", "preset"), ("log_every", 0, "log_every"),
])
def test_bad_config_values(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=f"TrainConfig.{match}"):
        _cfg(tmp_path, **{field: value}).resolved()


def test_bad_setups_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(_cfg(tmp_path, cuda_graph=True))
    with pytest.raises(ValueError, match="fp16 needs a GradScaler"):
        Trainer(_cfg(tmp_path, cuda_graph=True, amp="fp16"))
    with pytest.raises(ValueError, match="unknown dataset"):
        Trainer(_cfg(tmp_path, dataset="mnist"))
    with pytest.raises(ValueError, match="not a torch device"):
        Trainer(_cfg(tmp_path, device="tpu:x"))
    assert not (tmp_path / "run").exists()


def test_train_function(tmp_path):
    path = ddpm_fast.train(_cfg(tmp_path, steps=2, save_every=0))
    assert path.endswith("model.safetensors") and os.path.isfile(path)
    from ddpm_fast import training  # importing the subpackage must not replace the function
    assert ddpm_fast.train is training.train
    path = ddpm_fast.train(_cfg(tmp_path, "again", steps=1, save_every=0), steps=1)
    assert os.path.isfile(path)


@pytest.mark.parametrize("warm_at, class_dropout", [(0, None), (2, None), (2, 0.5)])
def test_graph_warmup_is_undone(tmp_path, warm_at, class_dropout):
    """The CUDA-graph capture warms up with real steps and then restores weights, EMA, AdamW state and seed;
    on the CPU the same undo (at a fresh start and with AdamW state present) must leave the run bitwise as if
    the warm-up never happened (also for a class-conditional model, whose labels sit in a static buffer)."""
    from ddpm_fast.training.graph import _restore, _snapshot
    runs = []
    for name, warm in (("plain", False), ("warmed", True)):
        trainer = Trainer(_cfg(tmp_path, name, steps=4, save_every=0, class_dropout=class_dropout))
        for batch in trainer._batches():
            if warm and trainer.step == warm_at:
                trainer._prepare_step()
                trainer.stepper.load_batch(*batch)
                snap = _snapshot(trainer.stepper)
                for _ in range(3):
                    trainer.stepper._body()
                _restore(trainer.stepper, snap)
            trainer.train_step(*batch)
        runs.append(trainer)
    a, b = runs
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.ema.shadow, b.ema.shadow))
    for p, q in zip(a.stepper.params, b.stepper.params):
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.gpu
@pytest.mark.parametrize("amp, class_dropout", [("none", None), ("bf16", None), ("none", 0.3)])
def test_cuda_graph_matches_eager(tmp_path, amp, class_dropout):
    """Same seed: the graphed step gives the eager loss curve and weights within fp tolerance (a conditional
    model too: its labels are copied into a static buffer that every replay reads)."""
    runs = {}
    for graph in (False, True):
        trainer = Trainer(_cfg(tmp_path, f"graph{graph}", steps=30, batch_size=32, amp=amp, log_every=1,
                               save_every=0, device="cuda", cuda_graph=graph, class_dropout=class_dropout))
        trainer.fit()
        runs[graph] = (torch.tensor([r["loss"] for r in read_metrics(os.path.join(trainer.run_dir,
                                                                                   "metrics.jsonl"))]),
                       torch.cat([p.detach().flatten().float().cpu() for p in trainer.net.parameters()]))
    tol = 2e-3 if amp == "none" else 3e-2
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=tol, atol=tol)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=10 * tol, atol=10 * tol)


def test_identical_runs_write_identical_checkpoints(tmp_path):
    """--seed fixes every RNG a checkpoint stores (torch's, NumPy's and Python's global states included), and the
    safetensors header is written in a fixed order: two identical runs in one process, with unrelated draws from
    those RNGs in between, write byte-identical checkpoints and model files."""
    import random
    import numpy as np
    files = []
    for name in ("a", "b"):
        np.random.rand(3), random.random(), torch.rand(2)  # whatever the process did before
        cfg = _cfg(tmp_path, "run", steps=4, save_every=0, log_every=2)  # the same --out: it is in the config
        Trainer(cfg).fit()
        files.append({f: open(os.path.join(cfg.out, f), "rb").read()
                      for f in (checkpoint.RUN_CHECKPOINT, checkpoint.RUN_MODEL)})
        os.rename(cfg.out, tmp_path / name)
    for file in files[0]:
        a, b = files[0][file], files[1][file]
        assert a == b, (file, next(i for i, (x, y) in enumerate(zip(a, b)) if x != y))
