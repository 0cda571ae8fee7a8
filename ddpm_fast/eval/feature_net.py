"""The small classifiers whose penultimate layer is the feature space of ddpm_fast's quality metric.

There are no Inception weights offline, so each dataset gets its own small CNN trained on its train split
(weights committed as ddpm_fast/assets/features_<dataset>.safetensors, with a JSON next to it recording the
command, seed, epochs, time and test accuracy). Reproduce one with
    python -m ddpm_fast.metrics train-features --dataset digits --out ddpm_fast/assets/features_digits.safetensors
Training is deterministic for a given seed, thread count, torch build and CPU (the CPU conv kernels' summation
order depends on the last three): on another CPU a retrained net has other weights (another digest) and scores
about 1-2% apart, which tests/eval/test_metrics.py bounds.
"""
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn

from ..files import ASSETS, atomic_write



@dataclass
class FeatureNetConfig:
    """A CNN: per width a 3x3 conv + ReLU, then a 2x2 max-pool while the image is at least 4 pixels wide;
    flatten -> Linear(feature_dim) + ReLU (the features) -> Linear(num_classes)."""
    in_channels: int = 1
    image_size: int = 28
    widths: Tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = 10


PRESETS = {
    "digits": FeatureNetConfig(in_channels=1, image_size=8, widths=(32, 64, 128), feature_dim=64),
    "fashion-mnist": FeatureNetConfig(in_channels=1, image_size=28, widths=(16, 32, 64), feature_dim=128),
}


@dataclass
class FeatureTrainConfig:
    """How a feature net is trained (recorded in its JSON). Adam with a cosine learning-rate decay."""
    dataset: str = "digits"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None  # folder / npz datasets: resize + center-crop (as TrainConfig.image_size)
    holdout: float = 0.1              # folder / npz datasets: the held-out fraction the test accuracy uses
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1  # deterministic; on a shared 2-core machine 2 threads ran 18x slower (OpenMP spinning)
    net: Optional[FeatureNetConfig] = field(default=None)


class FeatureNet(nn.Module):
    """x: (N, C, S, S) float32 in [-1, 1] -> logits (N, num_classes); ``features(x)`` -> (N, feature_dim)."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.cfg = cfg
        layers, c, s = [], cfg.in_channels, cfg.image_size
        for w in cfg.widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
            if s >= 4:
                layers.append(nn.MaxPool2d(2))
                s //= 2
            c = w
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c * s * s, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        # Set after training to the RMS of the train split's penultimate activations, so that features have
        # mean square ~1 per dimension: KID's kernel (x.y / D + 1)^3 assumes such a scale (Inception's pool
        # features have it), and FD values stay in a readable range.
        self.register_buffer("feature_scale", torch.ones(()))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The metric's features: (N, C, S, S) float32 in [-1, 1] -> (N, feature_dim) float32, the penultimate
        layer (after its ReLU) divided by ``feature_scale``."""
        return self.penultimate(x) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))


def default_path(dataset: str) -> str:
    """Where the committed feature net of a built-in dataset lives."""
    return os.path.join(ASSETS, f"features_{dataset}.safetensors")


def load_feature_net(name_or_path: str, device=None) -> FeatureNet:
    """A dataset name ("digits", "fashion-mnist") or a .safetensors path -> FeatureNet in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    is_path = name_or_path.endswith(".safetensors")
    path = name_or_path if is_path else default_path(name_or_path)
    if not os.path.isfile(path) or not (is_path or name_or_path in PRESETS):
        where = f"at {path}" if is_path or name_or_path in PRESETS else \
            f"committed for dataset {name_or_path!r} (committed: {', '.join(PRESETS)})"
        raise FileNotFoundError(
            f"no feature net {where}. Train one with `python -m ddpm_fast.metrics train-features "
            f"--dataset DATASET --out FILE.safetensors` and pass feature_net=FILE.safetensors")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
        raw = json.loads(meta["config"])
        net = FeatureNet(FeatureNetConfig(**{**raw, "widths": tuple(raw["widths"])}))
        net.load_state_dict(state)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as err:
        raise ValueError(f"{path} is not a valid ddpm_fast feature net: {err}") from None
    return net.eval().to(device)


def save_feature_net(net: FeatureNet, path: str, info: Optional[dict] = None) -> None:
    """Writes the weights (+ config in the safetensors metadata) and, when ``info`` is given, a JSON next to
    them (same name, .json). Both atomically: a temp file in the same directory, then rename."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"config": json.dumps(asdict(net.cfg)), "format": "ddpm_fast.feature_net/1"}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    if info is not None:
        info = {**info, "weights_sha256": weights_digest(state), "bytes": os.path.getsize(path)}
        text = json.dumps(info, indent=2) + "\n"
        atomic_write(os.path.splitext(path)[0] + ".json", lambda tmp: open(tmp, "w").write(text))


def weights_digest(state: dict) -> str:
    """sha256 over the tensors (sorted by name: name, dtype, shape, bytes). Not the file's hash: safetensors
    writes its metadata in no fixed order, so identical weights can give different files."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy. images: (N, C, S, S) uint8; labels: (N,) int64."""
    from ..data import to_float
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (net(to_float(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


@torch.no_grad()
def _feature_rms(net: FeatureNet, images: torch.Tensor, batch_size: int = 1000) -> float:
    """sqrt(mean over images and dimensions of penultimate^2). images: (N, C, S, S) uint8."""
    from ..data import to_float
    net.eval()
    total = sum(net.penultimate(to_float(images[i:i + batch_size])).double().square().sum().item()
                for i in range(0, len(images), batch_size))
    return (total / (len(images) * net.cfg.feature_dim)) ** 0.5


def train_feature_net(cfg: FeatureTrainConfig, log=print) -> Tuple[FeatureNet, dict]:
    """Trains the classifier on ``cfg.dataset``'s train split on the CPU; returns it and a record of the run
    (config, seconds, train/test accuracy) for the JSON written beside the weights."""
    from ..data import load_dataset, to_float
    kw = dict(data_dir=cfg.data_dir, image_size=cfg.image_size, holdout=cfg.holdout)
    train = load_dataset(cfg.dataset, "train", **kw)
    test = load_dataset(cfg.dataset, "test", **kw)
    if train.labels is None:
        raise ValueError(f"{cfg.dataset} has no labels; a feature net is a classifier and needs them (a folder "
                         f"dataset: one sub-folder per class, DIR/CLASS/IMAGE.png)")
    if train.num_classes < 2:
        raise ValueError(f"{cfg.dataset} has {train.num_classes} class; a feature net needs at least 2")
    net_cfg = cfg.net or PRESETS.get(cfg.dataset) or FeatureNetConfig(
        in_channels=train.shape[0], image_size=train.shape[1], num_classes=train.num_classes)
    if (net_cfg.in_channels, net_cfg.image_size, net_cfg.image_size) != train.shape:
        raise ValueError(f"feature net config expects {net_cfg.in_channels}x{net_cfg.image_size}x"
                         f"{net_cfg.image_size} images but {cfg.dataset} has {train.shape}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:  # everything that fixes the weights and the recorded numbers runs on cfg.threads
        net, seconds, load_start = _fit(cfg, net_cfg, train, log)
        net.feature_scale.fill_(_feature_rms(net, train.images))
        accuracies = accuracy(net, train.images, train.labels), accuracy(net, test.images, test.labels)
    finally:
        torch.set_num_threads(threads)  # the caller's thread count, as it was
    info = {"dataset": cfg.dataset, "train_config": {**asdict(cfg), "net": asdict(net_cfg)},
            "seconds": round(seconds, 1), "train_accuracy": accuracies[0],
            "test_accuracy": accuracies[1], "n_train": len(train),
            "n_test": len(test), "feature_scale": net.feature_scale.item(), "torch": torch.__version__,
            "threads": cfg.threads, "load_average_1min": [load_start, os.getloadavg()[0]]}
    log(f"train accuracy {info['train_accuracy']:.4f}, test accuracy {info['test_accuracy']:.4f}, "
        f"{seconds:.1f} s")
    return net.eval(), info


def _fit(cfg: FeatureTrainConfig, net_cfg: FeatureNetConfig, train, log) -> Tuple[FeatureNet, float, float]:
    """(trained net, seconds, 1-minute load average at the start): AdamW with a cosine decay, seeded batches."""
    from ..data import to_float
    torch.manual_seed(cfg.seed)
    net = FeatureNet(net_cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(net(to_float(train.images[idx])), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.4f}  {time.perf_counter() - start:.1f} s")
    return net, time.perf_counter() - start, load_start
