"""Data-parallel calibration over ``torch.distributed``.

Under ``torchrun`` (or any launcher that initialises the default process
group) every rank loads the whole model and calibrates the windows
``rank::world_size``; the statistics are sums (float64) and counts, so one
all-reduce of each gives exactly what one process would have summed, up to
the order of the float additions. Without an initialised process group every
function here is the single-process identity, so callers need no branches.
"""
from __future__ import annotations


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return rank() == 0


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensor):
    """Overwrite ``tensor`` on every rank with rank 0's, in place; returns it.
    Used where each rank computed the same thing and a last rounding
    difference (an eigensolver's) must not make the ranks disagree."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)
    return tensor


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group a launcher describes (``torchrun`` sets WORLD_SIZE, RANK,
    MASTER_ADDR, ...): gloo on CPU, nccl on CUDA. Returns True when running distributed."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _initialized():
        return _initialized()
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return True
