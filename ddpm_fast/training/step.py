"""The pieces of one training step: deterministic per-step randomness, batches, EMA, and the step itself
(eager, or captured whole in one CUDA graph).

Every random draw of step ``s`` on rank ``r`` is a pure function of (seed, r, s): the data order is
DistributedSampler's permutation of epoch s // steps_per_epoch, flips and timesteps come from a generator
seeded with mix(seed, r, s), the q_sample noise from the Philox key mix(seed, r) + s, dropout from the global
RNG reseeded with mix(seed, r, s) before the step, and (class-conditional runs) which labels become the null
label from a generator of its own seeded with mix(seed, r, s), so unconditional runs draw what they always
did. So a resumed run draws exactly what the straight run drew (no generator state to carry), batches can be
made by DataLoader workers, and a CUDA graph replays the same draws as eager steps.
"""
import contextlib
from typing import Dict, List, Optional

import torch

from ..diffusion import training_losses
from ..ops.q_sample import q_sample

# Stream tags that keep the per-step seeds of different uses apart.
STREAM_BATCH, STREAM_DROPOUT, STREAM_NOISE, STREAM_INIT = 1, 2, 3, 4
STREAM_LABELS, STREAM_GLOBAL = 5, 6
_M64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 62-bit seed from ints (splitmix64 chained): distinct inputs give unrelated seeds. 62 bits leave room
    to add a step count to a q_sample key without overflowing int64."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h >> 2


def seed_global_rngs(seed: int, rank: int) -> None:
    """Seeds torch's, NumPy's and Python's global RNGs from the run's seed and the rank. The run draws nothing
    from NumPy's or Python's, but a checkpoint stores all three states: unseeded, they would start from OS
    entropy and two identical runs would write different checkpoints."""
    import random
    import numpy as np
    value = mix(seed, rank, STREAM_GLOBAL)
    torch.manual_seed(value)
    np.random.seed(value % 2 ** 32)
    random.seed(value)


class StepBatches(torch.utils.data.Dataset):
    """Item i = the (x0, t) batch of step ``start + i`` for one rank: x0 (b, C, H, W) float32 in [-1, 1] (flipped
    when the dataset flips), t (b,) int64 timesteps in [0, T). A pure function of the step (see module doc).

    With ``class_dropout`` (a float in [0, 1)) items are (x0, t, y): y (b,) int64 the images' labels, each
    replaced by ``null_label`` with probability class_dropout.
    """

    def __init__(self, dataset, rank: int, world_size: int, batch: int, T: int, seed: int, start: int,
                 stop: int, class_dropout: Optional[float] = None, null_label: Optional[int] = None):
        self.dataset, self.rank, self.batch, self.T, self.seed = dataset, rank, batch, T, seed
        self.start, self.stop = start, stop
        if class_dropout is not None and (dataset.labels is None or null_label is None):
            raise ValueError(f"class_dropout needs a dataset with labels and a null label; {dataset.name!r} has "
                             f"{'no labels' if dataset.labels is None else 'labels, but no null label was given'}")
        self.class_dropout, self.null_label = class_dropout, null_label
        self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                           shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"dataset {dataset.name!r} has {len(dataset)} training images: {world_size} "
                             f"process(es) x batch {batch} need at least {world_size * batch}; lower --batch-size")
        self._epoch, self._indices = -1, None

    def __len__(self):
        return self.stop - self.start

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices of step ``step`` on this rank."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._indices = epoch, torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        return self._indices[k * self.batch:(k + 1) * self.batch]

    def __getitem__(self, i):
        step = self.start + i
        indices = self.indices(step)
        g = torch.Generator().manual_seed(mix(self.seed, self.rank, step, STREAM_BATCH))
        x0 = self.dataset.batch(indices, generator=g)
        t = torch.randint(0, self.T, (self.batch,), generator=g)
        if self.class_dropout is None:
            return x0, t
        return x0, t, self.labels(indices, step)

    def labels(self, indices: torch.Tensor, step: int) -> torch.Tensor:
        """The labels of ``indices`` with the null label in place of a class_dropout fraction (Bernoulli per
        label), drawn from a generator seeded by (seed, rank, step) alone."""
        g = torch.Generator().manual_seed(mix(self.seed, self.rank, step, STREAM_LABELS))
        drop = torch.rand(len(indices), generator=g) < self.class_dropout
        return self.dataset.labels[indices].masked_fill(drop, self.null_label)


class EMA:
    """An exponential moving average of a module's floating-point state (parameters and float buffers).

    ``update(weight)``: shadow += weight * (live - shadow), weight a 0-dim float32 tensor on the module's device
    (= 1 - decay), as three fused torch._foreach ops, no host sync: capturable in a CUDA graph.
    """

    def __init__(self, module: torch.nn.Module):
        state = module.state_dict()
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self.live = [state[k] for k in self.names]  # detached aliases of the module's tensors
        self.shadow = [v.detach().clone().float() for v in self.live]

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        diff = torch._foreach_sub(self.live, self.shadow)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(self.shadow, diff)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor], path: str = "checkpoint") -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError(f"{path}: the EMA weights name other tensors than the model's")
        for name, shadow in zip(self.names, self.shadow):
            if state[name].shape != shadow.shape:
                raise ValueError(f"{path}: EMA tensor {name} has shape {tuple(state[name].shape)}, the model's "
                                 f"{tuple(shadow.shape)}")
            shadow.copy_(state[name])


def ema_decay(ema: float, updates: int) -> float:
    """The decay of EMA update number ``updates`` (0-based): min(ema, (1 + n) / (10 + n))."""
    return min(ema, (1 + updates) / (10 + updates))


def warmup_lr(lr: float, warmup: int, step: int) -> float:
    """Linear warmup: lr * min(1, (step + 1) / warmup) (lr itself when warmup is 0)."""
    return lr if warmup <= 0 else lr * min(1.0, (step + 1) / warmup)


class TrainStep:
    """One optimizer step on static buffers: q_sample (fused, noise drawn in the op from ``seed``) -> U-Net ->
    loss -> backward -> grad clip -> AdamW -> EMA -> seed += 1, adding the loss to ``loss_sum``.

    Inputs are written into ``x0`` (B, C, H, W) float32, ``t`` (B,) int64, ``y`` (B,) int64 class labels (a
    conditional ``net`` only; else None), ``ema_weight`` (0-dim) and the optimizer's lr before each ``run()``,
    so the same code runs eagerly or as a replayed CUDA graph.
    model: the module to call (a DDP wrapper under torchrun); net: the UNet inside it.
    """

    def __init__(self, model, net, optimizer, ema: EMA, tables, batch_shape, device, amp: str,
                 grad_clip: float, scaler=None, channels_last: bool = False):
        self.model, self.net, self.optimizer, self.ema, self.tables = model, net, optimizer, ema, tables
        self.amp, self.grad_clip, self.scaler = amp, grad_clip, scaler
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x0 = torch.zeros(batch_shape, device=device).contiguous(memory_format=fmt)
        self.t = torch.zeros(batch_shape[0], dtype=torch.int64, device=device)
        conditional = getattr(net, "null_label", None) is not None
        self.y = torch.zeros(batch_shape[0], dtype=torch.int64, device=device) if conditional else None
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.ema_weight = torch.zeros((), dtype=torch.float32, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.params: List[torch.nn.Parameter] = [p for p in net.parameters() if p.requires_grad]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.graph_mode = False  # set by train_graph.capture, from its warm-up on

    def _autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        # No cast cache under a CUDA graph: cached copies made while warming up must not leak into the capture.
        return torch.autocast(self.x0.device.type, dtype=dtype, cache_enabled=not self.graph_mode)

    def loss(self) -> torch.Tensor:
        """The mean training loss of the current batch (forward only), fp32 scalar."""
        diffusion = self.net.diffusion
        with self._autocast():
            x_t, eps = q_sample(self.tables, self.x0, self.t, seed=self.seed)
            # t is a step index == the timestep (no respacing in training)
            out = self.model(x_t, self.t) if self.y is None else self.model(x_t, self.t, self.y)
        terms = training_losses(self.tables, out.float(), self.x0, x_t, self.t, eps,
                                prediction=diffusion.prediction, variance=diffusion.variance,
                                min_snr_gamma=diffusion.min_snr_gamma)
        return terms["loss"].mean()

    def _body(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.ema_weight)
        self.seed.add_(1)
        self.loss_sum.add_(loss.detach())

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()

    def load_batch(self, x0: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        if (y is None) != (self.y is None):
            raise ValueError("a conditional model's steps need class labels y, an unconditional model's none")
        self.x0.copy_(x0, non_blocking=True)
        self.t.copy_(t, non_blocking=True)
        if y is not None:
            self.y.copy_(y, non_blocking=True)
