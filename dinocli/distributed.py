"""Thin helpers over :mod:`torch.distributed` that are no-ops in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinocli.runtime import resolve_device


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[ProcessGroup, torch.device]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``), if any.

    NCCL on CUDA, gloo on the CPU. Without torchrun's variables this is a single process.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return ProcessGroup(), resolve_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device_name in ("auto", "cuda") else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return ProcessGroup(rank, world, local_rank), device
