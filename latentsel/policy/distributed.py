"""Data parallelism under ``torchrun``: one process per device, gloo on CPU, NCCL on CUDA.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op and the
process is rank 0 of 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "teardown", "all_sum", "pick_device"]


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """``device`` if given, else the local CUDA device when present, else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: str | None = None) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        # a rank that tears down while another still works (rank 0 saving, say) can abort
        # in the gloo transport at exit; leave together
        dist.barrier()
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Elementwise sum of ``values`` over all ranks (float64, on the rank's device)."""
    if not d.enabled:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()
