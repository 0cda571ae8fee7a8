"""CPU threads: the "auto" rule (one thread for small models), a scoped thread count, and its validation.

Small U-Nets are overhead-bound on the CPU: their ops are too small to split, and every op's OpenMP region
waits for its slowest thread, so on a machine with other work running a second thread that is descheduled
stalls every op (measured: benchmarks/bench_threads.py, docs/sampling.md "Threads"). "auto" therefore runs
one thread when the work of one model call is below ``SMALL_WORK`` and leaves torch's own setting otherwise.

Work of a model call = parameters x pixels per image x batch: for the DDPM U-Nets 0.3-0.35 x that in FLOPs
(tiny preset at 32x32: 0.28, the CIFAR-10 U-Net: 0.34), counted without running anything.

The U-Net's float rounding depends on the thread count, so images of one seed are reproducible for a given
thread count; "auto" decides from the model and batch alone, never from a timing.
"""
import contextlib
from typing import Optional, Union

import torch

SMALL_WORK = 2 ** 34  # ~1.7e10: the bundled digits model at batch 64 is 2.8e9, the CIFAR-10 U-Net at batch 1 3.7e10


def model_work(model, image_hw, batch: int) -> int:
    """parameters x H x W x batch of one model call (0 for a model without parameters)."""
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    h, w = image_hw
    return int(params) * int(h) * int(w) * int(batch)


def auto_threads(work: int, device="cpu") -> Optional[int]:
    """The "auto" thread count: 1 for CPU work below SMALL_WORK, else None (torch's setting stays)."""
    return 1 if torch.device(device).type == "cpu" and work < SMALL_WORK else None


def check_threads(value, name: str = "threads") -> Union[str, int, None]:
    """"auto", None (leave torch's setting) or an int >= 1; TypeError / ValueError otherwise."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be 'auto', None or an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def resolve_threads(value, work: int, device="cpu") -> Optional[int]:
    """The thread count to use for ``value`` ("auto" | None | int), or None to leave torch's setting."""
    value = check_threads(value)
    return auto_threads(work, device) if value == "auto" else value


@contextlib.contextmanager
def using_threads(threads: Optional[int]):
    """torch's intra-op thread count set to ``threads`` inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def describe_threads() -> str:
    """"N thread(s)" of torch's current setting, for start-of-run summaries."""
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}"
