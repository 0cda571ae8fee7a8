"""DDP with --compile on the CPU: torchrun launches 2 gloo processes that train the compiled micro U-Net
(torch.compile around DDP, so dynamo splits the graph at DDP's gradient buckets); ranks stay in sync and 2 steps +
resume + 2 steps equal 4 straight steps bitwise. AOTAutograd's "aot_eager" backend stands in for inductor here
(dynamo, DDP's graph splitting and the traced forward and backward, without inductor's code generation, which
would cost each process ~40 s of compiling): inductor's resume is tested in one process (test_compile.py)."""
import json
import textwrap

import pytest

from clirun import torchrun

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    out = sys.argv[1]
    dist.init_process_group("gloo")
    from ddpm_fast import compiler
    from ddpm_fast.models import config
    compiler.BACKEND = "aot_eager"
    config.PRESETS["tiny"] = {**config.PRESETS["tiny"], "ch": 8, "ch_mult": (1,), "num_groups": 4,
                              "attn_resolutions": (), "mid_attention": False}
    from ddpm_fast.training import Trainer, TrainConfig
    common = dict(dataset="digits", batch_size=8, lr=1e-3, warmup=2, log_every=2, save_every=0, device="cpu",
                  flip=True, compile=True)
    Trainer(TrainConfig(steps=2, out=out + "/split", **common)).fit()
    resumed = Trainer(TrainConfig(steps=4, out=out + "/split", resume=True, **common))
    compiled = type(resumed.model).__name__
    resumed.fit()
    straight = Trainer(TrainConfig(steps=4, out=out + "/straight", **common))
    straight.fit()
    flat = lambda tr: torch.cat([p.detach().flatten() for p in tr.net.parameters()] + [s.flatten() for s in
                                tr.ema.shadow])
    a, b = flat(resumed), flat(straight)
    gathered = [torch.zeros_like(a) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, a)
    json.dump({"rank": dist.get_rank(), "compiled": compiled, "resume_equal": torch.equal(a, b),
               "ranks_equal": all(torch.equal(g, a) for g in gathered)}, open(f"{out}/rank{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_with_compile_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_compile.py"
    script.write_text(SCRIPT)
    proc = torchrun(2, [script, tmp_path], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["rank"] == r and res["compiled"] == "OptimizedModule", res
        assert res["ranks_equal"], "ranks drifted apart"
        assert res["resume_equal"], "2 + resume + 2 compiled steps differ from 4 straight ones"
