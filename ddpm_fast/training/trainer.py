"""Training: ``ddpm_fast.train(TrainConfig(...))`` / ``ddpm-fast train ...`` / ``torchrun ... -m ddpm_fast train``.

A run directory (RUN_DIR = ``config.out``) holds:
    checkpoint.safetensors   model, EMA, AdamW state, step, RNG states, configs (every ``save_every`` steps and
                             at the end; written atomically, so a killed save leaves the previous one)
    model.safetensors        the EMA model at the end: ``ddpm_fast.load(RUN_DIR)`` / ``ddpm-fast sample``
    config.json              the TrainConfig, UNetConfig, DiffusionConfig of the run
    metrics.jsonl            one line per log: step, mean loss since the last log, lr, EMA decay, steps/s,
                             elapsed_s (the run's, over all sessions) and session_s (this session's)
    loss.png                 the loss curve (when matplotlib is installed)
``resume=True`` continues from checkpoint.safetensors exactly: on the CPU, 10 steps + resume + 10 steps give
bitwise the weights of 20 straight steps (see train_step's module doc for why every draw is reproducible).
``train(out=RUN_DIR, resume=True)`` takes the run's own settings (resume.py). SIGINT / SIGTERM stop the run
after the current step with a checkpoint (signals.py).
"""
import dataclasses
import json
import os
import shlex
import sys
from typing import Optional

import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..checkpoint import RUN_CHECKPOINT, RUN_MODEL
from ..files import atomic_write
from ..threads import describe_threads, model_work, resolve_threads, using_threads
from .config import RESUMABLE_CHANGES, TrainConfig
from .resume import CONFIG_JSON, resume_config
from .signals import GracefulStop, TrainingInterrupted, signal_test_hook
from .step import (EMA, STREAM_DROPOUT, STREAM_INIT, STREAM_NOISE, StepBatches, TrainStep, ema_decay, mix,
                   seed_global_rngs, warmup_lr)

METRICS, LOSS_PNG = "metrics.jsonl", "loss.png"


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
        self.dataset = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, flip=cfg.flip,
                                    image_size=cfg.image_size, holdout=cfg.holdout)
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device
        self._check_image_size()
        seed_global_rngs(cfg.seed, self.dist.rank)  # a resumed run then restores the checkpoint's states
        self._check_batch()
        self.num_classes = self._check_labels()
        self.net = self._build_model()
        c, h, w = self.dataset.shape
        self.threads = resolve_threads("auto" if cfg.threads is None else cfg.threads,
                                       model_work(self.net, (h, w), cfg.batch_size // self.dist.world_size),
                                       self.device)
        self.tables = self.net.diffusion.make_schedule().tables(self.device)
        self.ema = EMA(self.net)
        self.param_names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.model = self.net
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if cfg.compile:  # after DDP: dynamo then splits the graph at DDP's gradient buckets
            from ..compiler import compile_kwargs
            self.model = torch.compile(self.model, **compile_kwargs("default"))
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
            held_out = getattr(self.dataset, "held_out", None)
            held = f", or hold out fewer than {held_out} with --holdout (0 trains on every image)" if held_out \
                else ""
            raise ValueError(f"dataset {self.config.dataset!r} has {len(self.dataset)} training images, fewer than "
                             f"one batch of {b}; lower --batch-size{held}")

    def _check_image_size(self):
        """Square images whose size the preset's U-Net can halve len(ch_mult) - 1 times (a multiple of 2**that)."""
        from ..models.config import PRESETS
        c, h, w = self.dataset.shape
        if h != w:
            raise ValueError(f"{self.config.dataset} images are {h}x{w}; the U-Net presets need square images: "
                             f"pass --image-size S (resize, shorter side, and center-crop to S x S)")
        size, preset = h, self.config.preset
        factor = 2 ** (len(PRESETS[preset]["ch_mult"]) - 1)
        if size % factor:
            lower, upper = size // factor * factor, (size // factor + 1) * factor
            sizes = f"--image-size {lower} or {upper}" if lower else f"--image-size {upper}"
            raise ValueError(f"{self.config.dataset} images are {size}x{size}, but the {preset} preset's U-Net "
                             f"halves them {factor.bit_length() - 1} times, so it needs a size that is a multiple "
                             f"of {factor} for this preset: pass {sizes} (each image is resized, shorter side, "
                             f"and center-cropped)")

    def describe(self) -> list:
        """What the run trains on and with: dataset, model, device, threads, dtype (lines for the log)."""
        cfg, ds = self.config, self.dataset
        c, h, w = ds.shape
        held_out = getattr(ds, "held_out", None)
        held = "" if held_out is None else f", {held_out} held out for eval (--holdout {cfg.holdout:g})"
        params = sum(p.numel() for p in self.net.parameters())
        amp = {"none": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}[cfg.amp]
        amp += ", torch.compile (the first step compiles)" if cfg.compile else ""
        return [f"dataset {cfg.dataset}: {len(ds)} training images, {c}x{h}x{w}{held}",
                f"model: {cfg.preset} preset U-Net, {params / 1e6:.2f} M parameters, {h}x{w}x{c}",
                f"device {self.device} ({self.dist.world_size} process{'es' if self.dist.distributed else ''}), "
                f"{self._threads_text()}, {amp}, batch {cfg.batch_size}, {cfg.steps} steps"]

    def _threads_text(self):
        if self.device.type != "cpu":
            return describe_threads() + " (CPU side)"
        with using_threads(self.threads):
            text = describe_threads()
        return text + (" (auto)" if self.config.threads is None else "")

    def _check_labels(self) -> Optional[int]:
        """The class count of a conditional run (--class-dropout set): the dataset must have labels."""
        if self.config.class_dropout is None:
            return None
        if self.dataset.labels is None:
            raise ValueError(f"--class-dropout trains a class-conditional model, but dataset "
                             f"{self.config.dataset!r} has no labels (folder: one sub-directory per class; npz: a "
                             f"'labels' or 'y' array)")
        return self.dataset.num_classes

    def _build_model(self):
        from ..models import UNet
        c, h, _ = self.dataset.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(self.config.seed, STREAM_INIT))  # the same initial weights on every rank
            net = UNet.preset(self.config.preset, image_size=h, in_channels=c, num_classes=self.num_classes)
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
        saved = {**TrainConfig().to_dict(), **saved}  # fields newer than the checkpoint: their defaults
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in mine
                 if k not in RESUMABLE_CHANGES and saved.get(k) != mine[k]]
        if diffs:
            raise ValueError(f"{path} is from another run; --resume needs the same settings ("
                             + "; ".join(diffs) + ")")

    # ---- training -----------------------------------------------------------------------------------------

    def _batches(self):
        """An iterator over the (x0, t) (conditional runs: (x0, t, y)) CPU batches of steps self.step .. steps-1
        of this rank."""
        cfg = self.config
        ds = StepBatches(self.dataset, self.dist.rank, self.dist.world_size, cfg.batch_size // self.dist.world_size,
                         self.tables.num_steps, cfg.seed, self.step, cfg.steps, cfg.class_dropout,
                         self.net.null_label)
        if cfg.num_workers == 0:
            return (ds[i] for i in range(len(ds)))
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                             pin_memory=self.device.type == "cuda", prefetch_factor=4,
                                             worker_init_fn=_ignore_stop_signals)
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

    def train_step(self, x0: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        """One step on a given batch (x0 (b, C, H, W) float32 in [-1, 1], t (b,) int64, and for a conditional
        model y (b,) int64 labels, the null label included), eager or graphed."""
        self._prepare_step()
        self.stepper.load_batch(x0, t, y)
        if self.config.cuda_graph and self.stepper.graph is None:
            from .graph import capture
            capture(self.stepper)
            self._prepare_step()  # the warm-up consumed dropout's RNG; reseed for the first replay
        self.stepper.run()
        self.step += 1

    def fit(self) -> str:
        """Trains up to config.steps, logging and checkpointing; returns the path of RUN_DIR/model.safetensors.
        SIGINT / SIGTERM: the step in progress finishes, the checkpoint is written, TrainingInterrupted raised."""
        with using_threads(self.threads), GracefulStop(self.dist) as stop:
            if self.dist.is_main:
                for line in self.describe():
                    self.log(line)
            signum = self._loop(stop)
        if signum is not None and self.step < self.config.steps:
            path = self.save_checkpoint()
            distributed.barrier(self.dist)
            raise TrainingInterrupted(signum, self.step, path, self.resume_command())
        return self.finish()

    def _loop(self, stop):
        """The training loop; returns the signal number that stopped it, or None when it reached config.steps."""
        from .log import MetricsLog
        cfg = self.config
        metrics = MetricsLog(self.run_dir, self.dist, self.step, cfg.steps, self.log)
        if self.dist.is_main:
            self._write_config()
        last_log, signum = self.step, None
        try:
            for batch in self._batches():
                self.train_step(*batch)
                signal_test_hook(self.step, self.dist.rank)
                signum = stop.poll()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or signum is not None:
                    loss_sum = distributed.mean_over_ranks(self.stepper.loss_sum, self.dist).item()
                    loss, last_log = loss_sum / (self.step - last_log), self.step
                    self.stepper.loss_sum.zero_()
                    metrics.record(self.step, loss, warmup_lr(cfg.lr, cfg.warmup, self.step - 1),
                                   ema_decay(cfg.ema, self.step - 1))
                if signum is not None:
                    return signum
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        finally:
            metrics.close()
        return None

    def resume_command(self) -> str:
        """The shell command that continues this run (the run's own settings come from RUN_DIR)."""
        args = f"train --out {shlex.quote(self.run_dir)} --resume"
        if not self.dist.distributed:
            return f"ddpm-fast {args}"
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.dist.world_size)))
        launch = "--standalone" if nodes == 1 else f"--nnodes {nodes} (and your rendezvous options)"
        return f"torchrun {launch} --nproc_per_node {per_node} -m ddpm_fast {args}"

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


def _ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGINT / SIGTERM to the training process, which stops them after its checkpoint
    (a worker killed by Ctrl-C first would fail the batch the last step still needs)."""
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def train(config: Optional[TrainConfig] = None, **overrides) -> str:
    """Trains a DDPM; returns the path of the final EMA model (RUN_DIR/model.safetensors, for ddpm_fast.load).

    ``train(TrainConfig(dataset="digits", steps=2000, out="runs/digits"))`` or ``train(steps=2000, ...)``;
    ``train(out="runs/digits", resume=True, steps=4000)`` continues a run with its own settings (only fields
    that may change on resume may be given). Under torchrun every process calls it; rank 0 writes the files.
    Leaves the process group as it found it. Raises TrainingInterrupted after SIGINT / SIGTERM (checkpoint saved).
    """
    if config is None and overrides.get("resume"):
        config = resume_config(overrides.get("out", TrainConfig().out), overrides)
    else:
        config = dataclasses.replace(config or TrainConfig(), **overrides)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return Trainer(config).fit()
    finally:
        if owns_group:
            distributed.cleanup()
