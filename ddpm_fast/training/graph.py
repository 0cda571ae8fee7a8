"""Captures a whole TrainStep (forward, backward, grad clip, capturable AdamW, EMA, seed update) in one CUDA graph.

Capture needs a few eager warm-up steps first (cuDNN/cuBLAS pick their algorithms, AdamW creates its state, the
autograd engine sets up its streams). Those steps must not change the run, so everything they touch (weights,
EMA, optimizer state, seed, loss sum) is snapshotted before and restored after: the first replay then computes
exactly what the first eager step would have. Replays read their inputs from the step's static buffers, the
optimizer's lr tensor and the EMA weight tensor, which the trainer fills (asynchronously) before each replay.
"""
import torch

from ..ops import device as _device
from .step import TrainStep


def check_capturable(step: TrainStep) -> None:
    """Clear errors for set-ups a graph cannot hold (checked before any work)."""
    if step.x0.device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device; training runs on {step.x0.device}")
    if step.scaler is not None:
        raise ValueError("--cuda-graph cannot capture fp16's GradScaler (it syncs on inf checks); use --amp bf16")
    if getattr(step.model, "_orig_mod", step.model) is not step.net:  # a compiled net is fine, DDP is not
        raise ValueError("--cuda-graph runs in one process; under torchrun (DDP) train without it")
    for group in step.optimizer.param_groups:
        if not group.get("capturable", False) or not isinstance(group["lr"], torch.Tensor):
            raise ValueError("--cuda-graph needs an optimizer built with capturable=True and a tensor lr")


def _snapshot(step: TrainStep) -> dict:
    opt_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in step.optimizer.state.items()}
    return {"params": [p.detach().clone() for p in step.params], "ema": [s.clone() for s in step.ema.shadow],
            "opt": opt_state, "seed": step.seed.clone(), "loss_sum": step.loss_sum.clone()}


@torch.no_grad()
def _restore(step: TrainStep, snap: dict) -> None:
    """Copies the snapshot back INTO the same tensors (the graph holds their addresses). Optimizer state that
    the warm-up created (a fresh run) is zeroed: AdamW's initial state is step 0, zero moments."""
    for p, saved in zip(step.params, snap["params"]):
        p.copy_(saved)
    for s, saved in zip(step.ema.shadow, snap["ema"]):
        s.copy_(saved)
    for p, state in step.optimizer.state.items():
        saved = snap["opt"].get(p)
        for k, v in state.items():
            if torch.is_tensor(v):
                v.copy_(saved[k]) if saved is not None else v.zero_()
    step.seed.copy_(snap["seed"])
    step.loss_sum.copy_(snap["loss_sum"])


def capture(step: TrainStep, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warms up on a side stream, captures one step into ``step.graph``, restores the pre-warm-up state.

    The batch, seed, lr and EMA weight loaded in the step's buffers are the ones the first replay uses, so the
    caller fills them (and reseeds dropout) again after this returns.
    """
    check_capturable(step)
    snap = _snapshot(step)
    step.graph_mode = True  # the autocast cast cache stays off from the warm-up on
    # thread_local capture: a DataLoader's pin-memory thread may call CUDA while this thread captures
    graph = _device.capture_graph(step._body, step.x0.device, warmup=warmup)
    _restore(step, snap)
    step.graph = graph
    return graph
