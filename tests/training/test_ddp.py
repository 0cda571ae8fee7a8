"""DDP on the CPU: torchrun launches 2 processes with gloo; ranks stay in sync, only rank 0 writes, resume works."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

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
    result = {"rank": rank, "world": dist.get_world_size(), "start": start, "step": resumed.step,
              "resume_equal": torch.equal(a, b), "ranks_equal": all(torch.equal(g, a) for g in gathered),
              "batch": resumed.stepper.x0.shape[0]}
    json.dump(result, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["batch"] == 8  # the global batch 16, split
        assert res["start"] == 3 and res["step"] == 6
        assert res["ranks_equal"], "ranks drifted apart"
        assert res["resume_equal"], "3 + resume + 3 steps differ from 6 straight steps"
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
