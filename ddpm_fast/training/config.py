"""TrainConfig: every setting of a training run (the `ddpm-fast train` flags are derived from its fields).

Kept free of torch imports so that building the command line parser stays fast.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

AMP_MODES = ("none", "bf16", "fp16")

# Defaults that depend on the preset (fields left at None take them). "ddpm_cifar10" is the DDPM paper's recipe
# (Ho et al. 2020, CIFAR-10: Adam 2e-4, 5000 warmup steps, batch 128, EMA 0.9999, 800k steps, grad clip 1).
# "tiny" is tuned for a short CPU run on 8x8 digits (a few thousand steps): a larger lr and a short warmup reach
# a low loss in minutes, and EMA 0.999 averages over ~1000 steps instead of 10000 that such a run never has.
# (Tried on digits: 8000 steps with the lr decaying to 0 on a half cosine scored no better than these 6000 steps at
# a constant lr -- FD 0.122 / 0.148 vs 0.093 / 0.128 for sampling seeds 0 / 1 -- so the recipe keeps it simple.)
RECIPES = {
    "ddpm_cifar10": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, ema=0.9999, save_every=10_000),
    "tiny": dict(steps=6000, batch_size=64, lr=1e-3, warmup=200, ema=0.999, save_every=1000),
}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


def parse_threads(text: str) -> Optional[int]:
    """The --threads flag: "auto" -> None (TrainConfig.threads's auto), else an int >= 1."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected 'auto' or an integer >= 1, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected 'auto' or an integer >= 1, got {value}")
    return value


@dataclass
class TrainConfig:
    """A DDPM training run. None fields take the preset's recipe (``RECIPES``) when the run starts.

    EMA decay at update n is min(ema, (1 + n) / (10 + n)): an average of every step so far early on, the fixed
    decay later. The learning rate rises linearly over ``warmup`` steps: lr * min(1, (step + 1) / warmup).
    ``batch_size`` is the GLOBAL batch: under torchrun each of the K processes takes batch_size / K.
    """
    dataset: str = _f("digits", "digits | fashion-mnist | folder:DIR | npz:FILE")
    image_size: Optional[int] = _f(None, "resize (shorter side, bicubic) and center-crop every image to SIZE x SIZE "
                                   "(folder / npz datasets; images of mixed sizes need it)",
                                   default_text="the images' own size")
    holdout: float = _f(0.1, "fraction of a folder / npz dataset held out for `ddpm-fast eval` (evenly spread: "
                        "0.1 = every 10th image; 0 trains on every image)")
    preset: str = _f("tiny", "U-Net preset (its image size and channels follow the dataset)",
                     choices=("tiny", "ddpm_cifar10"))
    steps: Optional[int] = _f(None, "total optimizer steps (a resumed run continues up to this number)")
    batch_size: Optional[int] = _f(None, "global batch size (split over the torchrun processes)")
    lr: Optional[float] = _f(None, "peak learning rate of AdamW")
    warmup: Optional[int] = _f(None, "linear learning-rate warmup steps (0: none)")
    grad_clip: Optional[float] = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    ema: Optional[float] = _f(None, "EMA decay in [0, 1) of the weights used for sampling")
    amp: str = _f("none", "autocast: none | bf16 | fp16 (fp16 uses a GradScaler)", choices=AMP_MODES)
    save_every: Optional[int] = _f(None, "write RUN_DIR/checkpoint.safetensors every K steps (0: only at the end)")
    out: str = _f("runs/ddpm", "run directory (RUN_DIR): checkpoints, model, metrics, loss curve")
    resume: bool = _f(False, "continue the run in RUN_DIR from its checkpoint")
    seed: int = _f(0, "seed of every random draw (data order, flips, timesteps, noise, dropout, init)")
    flip: bool = _f(False, "random horizontal flips of the training images")
    class_dropout: Optional[float] = _f(None, "train a class-conditional model on the dataset's labels, "
                                        "replacing this fraction of them by the null label (classifier-free "
                                        "guidance; 0.1 is usual); unset: an unconditional model")
    data_dir: Optional[str] = _f(None, "directory of the dataset files (fashion-mnist IDX files, ...)",
                                 default_text="fashion-mnist's Debian directory; folder / npz paths as given")
    num_workers: int = _f(0, "DataLoader worker processes preparing batches (0: in the training process)")
    log_every: int = _f(50, "log the mean loss and steps/s every K steps")
    cuda_graph: bool = _f(False, "capture the whole training step in one CUDA graph (CUDA only, one process)")
    compile: bool = _f(False, "compile the U-Net's forward and backward with torch.compile (inductor, its own CUDA "
                       "graphs off, so --cuda-graph captures the compiled step); the first step compiles (tens "
                       "of seconds on a CPU)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (torchrun: each process takes cuda:LOCAL_RANK)")
    threads: Optional[int] = _f(None, "torch CPU threads per process: N, or auto = 1 for a small model and batch "
                                "(see docs/training.md), else torch's default", parse=parse_threads,
                                metavar="N|auto", default_text="auto")

    def resolved(self) -> "TrainConfig":
        """A copy with the preset's recipe filled in and every value checked (ValueError names the field)."""
        if self.preset not in RECIPES:
            raise ValueError(f"TrainConfig.preset={self.preset!r}: choose one of {sorted(RECIPES)}")
        values = dataclasses.asdict(self)
        for name, default in RECIPES[self.preset].items():
            if values[name] is None:
                values[name] = default
        cfg = TrainConfig(**values)
        cfg.grad_clip = cfg.grad_clip or 0.0
        cfg._check()
        return cfg

    def _check(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "must be an int >= 1")
        for name in ("warmup", "save_every", "num_workers", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be an int >= 0")
        for name in ("image_size", "threads"):
            if getattr(self, name) is not None and (not _is_int(getattr(self, name)) or getattr(self, name) < 1):
                bad(name, "must be None or an int >= 1")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or \
                not 0 <= self.holdout < 1:
            bad("holdout", "must be a fraction in [0, 1)")
        if not _is_int(self.log_every) or self.log_every < 1:
            bad("log_every", "must be an int >= 1")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            bad("lr", "must be in (0, 1)")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            bad("grad_clip", "must be >= 0 (0: no clipping)")
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            bad("ema", "must be in [0, 1)")
        if self.class_dropout is not None and not (isinstance(self.class_dropout, (int, float)) and
                                                   not isinstance(self.class_dropout, bool) and
                                                   0 <= self.class_dropout < 1):
            bad("class_dropout", "must be in [0, 1) (the fraction of labels replaced by the null label) or None "
                "(an unconditional model)")
        if self.amp not in AMP_MODES:
            bad("amp", f"must be one of {AMP_MODES}")
        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset", "must be a non-empty string")
        if not isinstance(self.out, str) or not self.out:
            bad("out", "must name a run directory")
        if self.cuda_graph and self.amp == "fp16":
            bad("amp", "fp16 needs a GradScaler, which cannot run inside a CUDA graph; use --amp bf16 or none")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}")
        return cls(**d)


# Fields a resumed run may change; every other one must match the checkpoint's (else the run would not be the
# same run: another dataset, batch, seed, ... would silently change what "continue exactly" means).
RESUMABLE_CHANGES = ("steps", "save_every", "out", "resume", "num_workers", "log_every", "cuda_graph", "device",
                     "data_dir", "threads", "compile")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
