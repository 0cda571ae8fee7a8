"""DDP on the CPU: torchrun launches 2 processes with gloo; ranks stay in sync, only rank 0 writes, resume works
(for an unconditional and a class-conditional model), and a SIGTERM to one rank stops every rank after the same
step with a checkpoint that resumes exactly."""
import json
import os
import textwrap

import pytest

from clirun import torchrun

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from ddpm_fast.cli import main
    from ddpm_fast.training import Trainer, TrainConfig
    common = dict(dataset="digits", batch_size=16, lr=1e-3, warmup=2, log_every=1, save_every=0, device="cpu",
                  flip=True)
    # 3 steps through the command line, then resume to 6; a straight 6-step run to compare with
    assert main(["train", "--dataset", "digits", "--batch-size", "16", "--lr", "1e-3", "--warmup", "2",
                 "--log-every", "1", "--save-every", "0", "--device", "cpu", "--flip", "--steps", "3",
                 "--out", out + "/split"]) == 0
    resumed = Trainer(TrainConfig(steps=6, out=out + "/split", resume=True, **common))
    start = resumed.step
    resumed.fit()
    straight = Trainer(TrainConfig(steps=6, out=out + "/straight", **common))
    straight.fit()
    flat = lambda tr: torch.cat([p.detach().flatten() for p in tr.net.parameters()] + [s.flatten() for s in
                                tr.ema.shadow])
    a, b = flat(resumed), flat(straight)
    gathered = [torch.zeros_like(a) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, a)
    # SIGTERM to rank 1 only, after its step 2: every rank stops after step 3 (the flag is agreed one step late)
    import os
    from ddpm_fast import checkpoint
    os.environ["DDPM_FAST_TEST_SIGNAL"] = "2:SIGTERM:1"
    stop_code = main(["train", "--dataset", "digits", "--batch-size", "16", "--lr", "1e-3", "--warmup", "2",
                      "--log-every", "1", "--save-every", "0", "--device", "cpu", "--flip", "--steps", "6",
                      "--out", out + "/stopped"])
    del os.environ["DDPM_FAST_TEST_SIGNAL"]
    ckpt = out + "/stopped/checkpoint.safetensors"
    stopped_at = checkpoint.read_training_checkpoint(ckpt)[1]["state"]["step"]
    resume_code = main(["train", "--out", out + "/stopped", "--resume"])
    mine = {k: v for k, v in checkpoint.read_training_checkpoint(ckpt)[0].items()
            if k.startswith(("model.", "ema.", "optim."))}
    theirs = checkpoint.read_training_checkpoint(out + "/straight/checkpoint.safetensors")[0]
    result = {"rank": rank, "world": dist.get_world_size(), "start": start, "step": resumed.step,
              "resume_equal": torch.equal(a, b), "ranks_equal": all(torch.equal(g, a) for g in gathered),
              "batch": resumed.stepper.x0.shape[0], "stop_code": stop_code, "stopped_at": stopped_at,
              "resume_code": resume_code, "stop_resume_equal": all(torch.equal(v, theirs[k]) for k, v in mine.items())
              and len(mine) > 0}
    # a class-conditional run: 2 steps + resume + 2 steps against 4 straight steps, labels dropped per rank
    cond = dict(common, class_dropout=0.5)
    Trainer(TrainConfig(steps=2, out=out + "/csplit", **cond)).fit()
    resumed = Trainer(TrainConfig(steps=4, out=out + "/csplit", resume=True, **cond))
    resumed.fit()
    straight = Trainer(TrainConfig(steps=4, out=out + "/cstraight", **cond))
    labels = torch.cat([batch[2] for batch in straight._batches()])
    straight.fit()
    a, b = flat(resumed), flat(straight)
    gathered = [torch.zeros_like(a) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, a)
    seen = [torch.zeros_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, labels)
    result.update(cond_resume_equal=torch.equal(a, b), cond_ranks_equal=all(torch.equal(g, a) for g in gathered),
                  cond_labels_differ=not torch.equal(seen[0], seen[1]))
    json.dump(result, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    proc = torchrun(2, [script, tmp_path], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("training stopped by SIGTERM after step 3") == 1  # rank 0 says it, once
    assert "torchrun --standalone --nproc_per_node 2 -m ddpm_fast train --out" in proc.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["batch"] == 8  # the global batch 16, split
        assert res["start"] == 3 and res["step"] == 6
        assert res["ranks_equal"], "ranks drifted apart"
        assert res["resume_equal"], "3 + resume + 3 steps differ from 6 straight steps"
        assert res["cond_ranks_equal"] and res["cond_resume_equal"] and res["cond_labels_differ"], res
        assert res["stop_code"] == 143 and res["stopped_at"] == 3 and res["resume_code"] == 0
        assert res["stop_resume_equal"], "stopped by SIGTERM at 3 + resumed to 6 differs from 6 straight steps"
    run = tmp_path / "split"
    files = sorted(os.listdir(run))
    try:
        import matplotlib  # noqa: F401  (optional: the loss curve only)
        png = ["loss.png"]
    except ImportError:
        png = []
    assert files == ["checkpoint.safetensors", "config.json", *png, "metrics.jsonl", "model.safetensors"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer: no line twice
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
