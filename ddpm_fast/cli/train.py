"""`ddpm-fast train`: flags derived from TrainConfig; `--resume` takes the run's own settings; Ctrl-C / SIGTERM
stop after the current step with a checkpoint (exit 130 / 143)."""
import sys

from .common import UsageError, dataclass_flags, flag_name, given_values, usage_errors


def add(sub):
    from ..training.config import RECIPES, TrainConfig
    p = sub.add_parser("train", help="train a DDPM (checkpoints, resume, torchrun DDP)",
                       description="Train a DDPM on a dataset; writes checkpoints, the EMA model, metrics and a "
                       "loss curve into --out. `--out RUN --resume` continues a run with the settings it was "
                       "started with (only --steps, --save-every, --log-every, --device, --threads, "
                       "--num-workers, --data-dir, --cuda-graph, --compile may be given then). Ctrl-C or SIGTERM: the "
                       "current step finishes, the checkpoint is written, and the command to resume is printed "
                       "(exit 130 / 143). Under `torchrun --nproc_per_node K -m ddpm_fast train ...` it runs DDP "
                       "(NCCL on GPUs, gloo on the CPU).")

    def recipe(name):
        return "the preset's: " + ", ".join(f"{k} {v[name]}" for k, v in RECIPES.items()) if name in \
            RECIPES["tiny"] else None

    dataclass_flags(p, TrainConfig, recipe)
    p.set_defaults(func=run)


def _config(args):
    from ..training.config import TrainConfig
    from ..training.resume import resume_config
    given = given_values(args, TrainConfig)
    if given.get("resume"):
        return resume_config(given.get("out", TrainConfig().out), given, name=flag_name)
    return TrainConfig(**given)


def run(args):
    import torch.distributed as dist

    from .. import distributed
    from ..training import Trainer
    from ..training.signals import TrainingInterrupted
    owns_group = not dist.is_initialized()  # under torchrun the group is made here, unless a caller made it
    try:
        try:
            trainer = Trainer(_config(args))
        except usage_errors() as err:
            raise UsageError(str(err)) from None
        try:
            path = trainer.fit()
        except TrainingInterrupted as stop:
            if trainer.dist.is_main:
                print(f"ddpm-fast train: {stop}", file=sys.stderr, flush=True)
            return stop.exit_code
    finally:
        if owns_group:
            distributed.cleanup()
    if trainer.dist.is_main:
        print(f"trained {trainer.step} steps; EMA model: {path} (ddpm-fast sample --checkpoint {path})")
    return 0
