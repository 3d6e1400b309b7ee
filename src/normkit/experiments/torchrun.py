"""``normkit compare`` under ``torchrun``: every run data-parallel over all of torchrun's
processes, on one machine or many.

Started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), the
command joins the process group (gloo, ``env://``) and every process runs the same sweep in step:
each run trains with DDP on its slice of every batch, batch statistics synchronized with
:func:`normkit.sync` (the global batch is ``--batch-sizes``), exactly as ``--nproc N`` does with
local processes. Rank 0 owns the run directory: it decides which runs are left, appends the
records and writes the report; the other ranks print nothing. Example, 2 machines × 4 processes::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m normkit.cli compare --batch-sizes 64,256 --out runs/dist
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

__all__ = ["launched", "init", "active", "rank", "broadcast"]

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join torchrun's process group (gloo over ``env://``) unless already joined."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://")


def active() -> bool:
    """Whether a process group of more than one process is initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object); itself without a process group."""
    if not active():
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
