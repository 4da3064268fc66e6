"""Several training processes, one per GPU: the process group and the collectives training uses.

Under torchrun (or the train stage's own launcher, `stage.launch`) every
process sees WORLD_SIZE, RANK and LOCAL_RANK. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os

import torch

from ..device import resolve_device


def is_worker() -> bool:
    """Whether this process was started by torchrun or our launcher (one of N ranks)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device_name: str) -> tuple[int, torch.device]:
    """(rank, device): join the process group when WORLD_SIZE > 1; each rank takes its GPU."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if ranks == 1:
        return 0, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # Ranks wait at their first all-reduce of an epoch while rank 0 ends the last one
    # (strip, checkpoint, FID; the first strip compiles the EMA model): allow for it,
    # rather than NCCL's default 10 minutes.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), device


def world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def from_rank0(value: object) -> object:
    """Rank 0's `value` on every rank (the others' own are ignored); `value` in one process."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(*tensors: torch.Tensor) -> None:
    """Average tensors over ranks in place (a no-op in one process)."""
    import torch.distributed as dist

    if world()[1] > 1:
        for x in tensors:
            dist.all_reduce(x)
            x /= dist.get_world_size()


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
