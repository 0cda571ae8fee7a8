"""Training: ``ddpm_fast.train(TrainConfig(...))`` / ``ddpm-fast train ...`` / ``torchrun ... -m ddpm_fast train``.

A run directory (RUN_DIR = ``config.out``) holds:
    checkpoint.safetensors   model, EMA, AdamW state, step, RNG states, configs (every ``save_every`` steps and
                             at the end; written atomically, so a killed save leaves the previous one)
    model.safetensors        the EMA model at the end: ``ddpm_fast.load(RUN_DIR)`` / ``ddpm-fast sample``
    config.json              the TrainConfig, UNetConfig, DiffusionConfig of the run
    metrics.jsonl            one line per log: step, mean loss since the last log, lr, EMA decay, steps/s
    loss.png                 the loss curve (when matplotlib is installed)
``resume=True`` continues from checkpoint.safetensors exactly: on the CPU, 10 steps + resume + 10 steps give
bitwise the weights of 20 straight steps (see train_step's module doc for why every draw is reproducible).
"""
import dataclasses
import json
import os
import sys
from typing import Optional

import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..checkpoint import RUN_CHECKPOINT, RUN_MODEL
from ..files import atomic_write
from .config import RESUMABLE_CHANGES, TrainConfig
from .step import (EMA, STREAM_DROPOUT, STREAM_INIT, STREAM_NOISE, StepBatches, TrainStep, ema_decay, mix,
                   seed_global_rngs, warmup_lr)

METRICS, CONFIG_JSON, LOSS_PNG = "metrics.jsonl", "config.json", "loss.png"


class Trainer:
    """Builds the data, U-Net, AdamW, EMA and the step of a run; ``fit()`` trains to ``config.steps``.

    Attributes: config (resolved TrainConfig), net (the UNet), ema (EMA), optimizer, step (steps done),
    dist (rank / world size / device), run_dir.
    """

    def __init__(self, config: TrainConfig, log=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer(config): expected a TrainConfig, got {type(config).__name__}")
        self.config = cfg = config.resolved()
        self.run_dir = cfg.out
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._check_run_dir()
        from ..data import load_dataset
        self.dataset = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, flip=cfg.flip)
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device
        seed_global_rngs(cfg.seed, self.dist.rank)  # a resumed run then restores the checkpoint's states
        self._check_batch()
        self.net = self._build_model()
        self.tables = self.net.diffusion.make_schedule().tables(self.device)
        self.ema = EMA(self.net)
        self.param_names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.model = self.net
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        c, h, w = self.dataset.shape
        self.stepper = TrainStep(self.model, self.net, self.optimizer, self.ema, self.tables,
                                 (cfg.batch_size // self.dist.world_size, c, h, w), self.device, cfg.amp,
                                 cfg.grad_clip, self.scaler, channels_last=self.device.type == "cuda")
        if cfg.cuda_graph:
            from .graph import check_capturable
            check_capturable(self.stepper)
        self.step = 0
        if cfg.resume:
            self._resume()

    # ---- set-up -------------------------------------------------------------------------------------------

    def _check_run_dir(self):
        path = os.path.join(self.run_dir, RUN_CHECKPOINT)
        if self.config.resume and not os.path.isfile(path):
            raise FileNotFoundError(f"--resume: no checkpoint to resume at {path}")
        if not self.config.resume and os.path.exists(path):
            raise FileExistsError(f"{self.run_dir} already holds a run ({path}); pass --resume to continue it "
                                  f"or choose another --out")

    def _check_batch(self):
        world, b = self.dist.world_size, self.config.batch_size
        if b % world:
            raise ValueError(f"--batch-size {b} is the global batch; it must divide evenly over the {world} "
                             f"processes")
        if len(self.dataset) // world < b // world:  # DistributedSampler(drop_last) gives each rank n // world
            raise ValueError(f"dataset {self.config.dataset!r} has {len(self.dataset)} training images, fewer than "
                             f"one batch of {b}; lower --batch-size")
        c, h, w = self.dataset.shape
        if h != w:
            raise ValueError(f"{self.config.dataset} images are {h}x{w}; the U-Net presets need square images "
                             f"(folder datasets: pass an image size when loading)")

    def _build_model(self):
        from ..models import UNet
        c, h, _ = self.dataset.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(self.config.seed, STREAM_INIT))  # the same initial weights on every rank
            net = UNet.preset(self.config.preset, image_size=h, in_channels=c)
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.device.type == "cuda" else net

    def _build_optimizer(self):
        """AdamW (no weight decay, as DDPM's Adam). On CUDA the fused kernel; under --cuda-graph capturable with
        the lr in a device tensor that each replay reads."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if self.config.cuda_graph:
            lr = torch.tensor(self.config.lr, dtype=torch.float32, device=self.device)
            return torch.optim.AdamW(params, lr=lr, capturable=True, fused=True, **kw)
        return torch.optim.AdamW(params, lr=self.config.lr, fused=self.device.type == "cuda" or None, **kw)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "train_config": self.config.to_dict(), "world_size": self.dist.world_size,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def save_checkpoint(self) -> Optional[str]:
        """Rank 0 writes RUN_DIR/checkpoint.safetensors (atomically); returns its path (None on other ranks)."""
        if not self.dist.is_main:
            return None
        path = os.path.join(self.run_dir, RUN_CHECKPOINT)
        ckpt.write_training_checkpoint(path, self.net, self.ema.state_dict(), self.optimizer, self.param_names,
                                       self._state())
        return path

    def _resume(self):
        path = os.path.join(self.run_dir, RUN_CHECKPOINT)
        tensors, meta = ckpt.read_training_checkpoint(path)
        state = meta["state"]
        self._check_same_run(path, state["train_config"])
        ckpt.load_weights(self.net, ckpt.split_prefixed(tensors, "model"), path, "model weights")
        self.ema.load_state_dict(ckpt.split_prefixed(tensors, "ema"), path)
        ckpt.restore_optimizer(self.optimizer, ckpt.split_prefixed(tensors, "optim"), state["optimizer"],
                               self.param_names, path)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_states(tensors, state["rng"])
        self.step = int(state["step"])
        self.log(f"resumed {path} at step {self.step}")

    def _check_same_run(self, path, saved: dict):
        """Everything that defines the run must match the checkpoint's (steps, logging, device may change)."""
        mine = self.config.to_dict()
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in mine
                 if k not in RESUMABLE_CHANGES and saved.get(k) != mine[k]]
        if diffs:
            raise ValueError(f"{path} is from another run; --resume needs the same settings ("
                             + "; ".join(diffs) + ")")

    # ---- training -----------------------------------------------------------------------------------------

    def _batches(self):
        """An iterator over the (x0, t) CPU batches of steps self.step .. steps-1 of this rank."""
        cfg = self.config
        ds = StepBatches(self.dataset, self.dist.rank, self.dist.world_size, cfg.batch_size // self.dist.world_size,
                         self.tables.num_steps, cfg.seed, self.step, cfg.steps)
        if cfg.num_workers == 0:
            return (ds[i] for i in range(len(ds)))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                             pin_memory=self.device.type == "cuda", prefetch_factor=4)
        return iter(loader)

    def _prepare_step(self):
        """Per-step scalars into their (device) homes, and dropout's RNG reseeded for this step."""
        cfg, step = self.config, self.step
        lr = warmup_lr(cfg.lr, cfg.warmup, step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.stepper.ema_weight.fill_(1.0 - ema_decay(cfg.ema, step))
        self.stepper.seed.fill_(mix(cfg.seed, self.dist.rank, STREAM_NOISE) + step)
        torch.manual_seed(mix(cfg.seed, self.dist.rank, step, STREAM_DROPOUT))
        return lr

    def train_step(self, x0: torch.Tensor, t: torch.Tensor) -> None:
        """One step on a given batch (x0 (b, C, H, W) float32 in [-1, 1], t (b,) int64), eager or graphed."""
        self._prepare_step()
        self.stepper.load_batch(x0, t)
        if self.config.cuda_graph and self.stepper.graph is None:
            from .graph import capture
            capture(self.stepper)
            self._prepare_step()  # the warm-up consumed dropout's RNG; reseed for the first replay
        self.stepper.run()
        self.step += 1

    def fit(self) -> str:
        """Trains up to config.steps, logging and checkpointing; returns the path of RUN_DIR/model.safetensors."""
        from .log import MetricsLog
        cfg = self.config
        metrics = MetricsLog(self.run_dir, self.dist, self.step, cfg.steps, self.log)
        if self.dist.is_main:
            self._write_config()
        last_log = self.step
        for x0, t in self._batches():
            self.train_step(x0, t)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                loss_sum = distributed.mean_over_ranks(self.stepper.loss_sum, self.dist).item()
                loss, last_log = loss_sum / (self.step - last_log), self.step
                self.stepper.loss_sum.zero_()
                metrics.record(self.step, loss, warmup_lr(cfg.lr, cfg.warmup, self.step - 1),
                               ema_decay(cfg.ema, self.step - 1))
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        metrics.close()
        return self.finish()

    def finish(self) -> str:
        """The final checkpoint, the EMA model file and the loss curve (rank 0); all ranks wait for them."""
        path = os.path.join(self.run_dir, RUN_MODEL)
        if self.dist.is_main:
            self.save_checkpoint()
            info = {"made_by": "ddpm_fast.train", "step": self.step, "train_config": self.config.to_dict()}
            ckpt.write_safetensors(path, self.ema.state_dict(), ckpt.model_metadata(self.net, info))
            from .log import plot_loss
            plot_loss(os.path.join(self.run_dir, METRICS), os.path.join(self.run_dir, LOSS_PNG), self.log)
        distributed.barrier(self.dist)
        return path

    def _write_config(self):
        text = json.dumps({"train": self.config.to_dict(), "unet": self.net.config.to_dict(),
                           "diffusion": self.net.diffusion.to_dict(), "world_size": self.dist.world_size,
                           "torch": torch.__version__}, indent=2) + "\n"
        atomic_write(os.path.join(self.run_dir, CONFIG_JSON), lambda tmp: open(tmp, "w").write(text))


def train(config: Optional[TrainConfig] = None, **overrides) -> str:
    """Trains a DDPM; returns the path of the final EMA model (RUN_DIR/model.safetensors, for ddpm_fast.load).

    ``train(TrainConfig(dataset="digits", steps=2000, out="runs/digits"))`` or ``train(steps=2000, ...)``.
    Under torchrun every process calls it; rank 0 writes the files. Leaves the process group as it found it.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return Trainer(config).fit()
    finally:
        if owns_group:
            distributed.cleanup()
