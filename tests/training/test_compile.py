"""TrainConfig(compile=True) / `ddpm-fast train --compile`: the U-Net's forward and backward through
torch.compile, with exact resume (bitwise on the CPU, inductor itself), the CUDA-graph step capturing the
compiled step (CPU stand-in for the capture), and the flag. DDP with compile: test_ddp_compile.py.

The tests run a micro U-Net (the tiny preset patched to one level without attention: inductor compiles its
forward and backward in ~40 s on 2 cores, once per test session). Where inductor's code is not the point, dynamo's
counting "eager" backend stands in (``compiler.BACKEND``): it traces, guards and recompiles as for inductor and
runs the traced graph with PyTorch's own kernels, so a compiled run equals the uncompiled one bitwise.
"""
import os
import types

import pytest
import torch

from ddpm_fast import checkpoint, compiler
from ddpm_fast.training import Trainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread", "micro_preset")
MICRO = dict(ch=8, ch_mult=(1,), num_groups=4, attn_resolutions=(), mid_attention=False)


@pytest.fixture
def micro_preset(monkeypatch):
    from ddpm_fast.models import config
    monkeypatch.setitem(config.PRESETS, "tiny", {**config.PRESETS["tiny"], **MICRO})


@pytest.fixture(scope="module")
def counter():
    from torch._dynamo.testing import CompileCounterWithBackend
    return CompileCounterWithBackend("eager")


@pytest.fixture
def counting(counter, monkeypatch):
    monkeypatch.setattr(compiler, "BACKEND", counter)
    return counter


def _cfg(tmp_path, name, **kw):
    base = dict(dataset="digits", preset="tiny", steps=6, batch_size=8, lr=1e-3, warmup=2, ema=0.9, save_every=0,
                log_every=3, out=str(tmp_path / name), device="cpu", flip=True, compile=True)
    return TrainConfig(**{**base, **kw})


def _tensors(run_dir):
    tensors, meta = checkpoint.read_training_checkpoint(os.path.join(run_dir, checkpoint.RUN_CHECKPOINT))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta["state"]


def _assert_same_run(a_dir, b_dir):
    a, state_a = _tensors(a_dir)
    b, state_b = _tensors(b_dir)
    assert state_a["step"] == state_b["step"] and sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # model, EMA and AdamW moments, bitwise


def test_the_compiled_model_is_what_trains(tmp_path, counting):
    before = counting.frame_count
    compiled = Trainer(_cfg(tmp_path, "compiled"))
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.model._orig_mod is compiled.net and "torch.compile" in compiled.describe()[2]
    compiled.fit()
    assert counting.frame_count > before  # forward (and backward) traced by dynamo
    Trainer(_cfg(tmp_path, "plain", compile=False)).fit()
    _assert_same_run(compiled.run_dir, str(tmp_path / "plain"))  # the eager backend: PyTorch's kernels
    again = counting.frame_count
    Trainer(_cfg(tmp_path, "again")).fit()
    assert counting.frame_count == again  # a second run of the same architecture reuses the graphs


def test_compile_may_change_on_resume_and_the_flag(tmp_path, counting):
    from ddpm_fast.cli import main
    assert main(["train", "--dataset", "digits", "--batch-size", "8", "--steps", "3", "--save-every", "0",
                 "--log-every", "3", "--device", "cpu", "--compile", "--out", str(tmp_path / "cli")]) == 0
    assert _tensors(str(tmp_path / "cli"))[1]["train_config"]["compile"] is True
    assert main(["train", "--out", str(tmp_path / "cli"), "--resume", "--steps", "4"]) == 0  # the run's --compile
    from ddpm_fast.training.resume import resume_config
    resumed = Trainer(resume_config(str(tmp_path / "cli"), {"steps": 5, "compile": False}))
    assert resumed.step == 4 and resumed.model is resumed.net  # a performance setting: not part of the run


def test_cuda_graph_capture_of_the_compiled_step(tmp_path, counting, monkeypatch):
    """graph.capture on the compiled step, with a CPU stand-in for the CUDA capture (warm-up calls, then one
    "captured" call; replays re-run it): dynamo compiles in the warm-up, never inside the capture, and the
    restored warm-up leaves the run bitwise the one without a graph."""
    from ddpm_fast.training import graph as train_graph
    at_capture = []

    def fake_capture(body, device, pool=None, warmup=0):
        for _ in range(warmup):
            body()
        at_capture.append(counting.frame_count)
        body()
        return types.SimpleNamespace(replay=body)

    monkeypatch.setattr(train_graph, "check_capturable", lambda step: None)  # its device checks: test_trainer.py
    monkeypatch.setattr(train_graph._device, "capture_graph", fake_capture)
    runs = {}
    for graphed in (False, True):
        trainer = Trainer(_cfg(tmp_path, f"graph{graphed}"))
        for batch in trainer._batches():
            if graphed and trainer.stepper.graph is None:
                trainer._prepare_step()
                trainer.stepper.load_batch(*batch)
                train_graph.capture(trainer.stepper)
                trainer._prepare_step()
            trainer.train_step(*batch)
        runs[graphed] = trainer
    assert at_capture == [counting.frame_count]  # nothing compiled during or after the capture
    a, b = runs[False], runs[True]
    assert b.stepper.graph is not None
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.ema.shadow, b.ema.shadow))


@pytest.mark.slow
def test_inductor_compiled_training_resumes_bitwise(tmp_path):
    """Inductor's forward and backward (its own dropout RNG, seeded from the per-step global seed): 3 steps +
    resume + 3 steps give bitwise the checkpoint of 6 straight steps."""
    straight = Trainer(_cfg(tmp_path, "straight"))
    straight.fit()
    Trainer(_cfg(tmp_path, "split", steps=3)).fit()
    resumed = Trainer(_cfg(tmp_path, "split", resume=True))
    assert resumed.step == 3
    resumed.fit()
    _assert_same_run(straight.run_dir, resumed.run_dir)
    from ddpm_fast.training.log import read_metrics
    assert all(0 < r["loss"] < 10 for r in read_metrics(os.path.join(straight.run_dir, "metrics.jsonl")))
