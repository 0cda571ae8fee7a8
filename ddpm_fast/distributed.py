"""torch.distributed set-up for training and sharded sampling: torchrun's environment -> process group, device,
rank-0 duties, and the few collectives they need.

`torchrun --nproc_per_node K -m ddpm_fast train ...` (or `... sample --out-dir DIR`) sets RANK, WORLD_SIZE and
LOCAL_RANK; each process then works on ``cuda:LOCAL_RANK`` with NCCL, or on the CPU with gloo. Without those
variables (or with WORLD_SIZE=1) the job runs in one process and nothing here touches torch.distributed.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes files; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK; else as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (auto | cpu | cuda | cuda:N): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for CUDA, but torch.cuda.is_available() is False "
                             f"(torch {torch.__version__}); use --device cpu")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: ddpm_fast runs on cpu or cuda")
    return dev


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an int (set by torchrun)") from None


def torchrun_env() -> Tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)


def setup(device: str = "auto", timeout: Optional[datetime.timedelta] = None) -> DistInfo:
    """Joins the process group torchrun described (NCCL on CUDA, gloo on the CPU), or runs alone.

    timeout: how long a collective waits for the slowest rank (None: torch's default, 10-30 minutes)."""
    rank, world, local_rank = torchrun_env()
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        extra = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **extra)
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself when alone). A collective: every rank must call it."""
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (any picklable object) on every rank. A collective: every rank must call it."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank. A collective: every rank must call it."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
