"""Multi-process training under ``torchrun``: process group, rank roles and small collectives.

Every rank computes the same global batch's random draws (the data order, noise and steps come
from generators seeded identically on every rank) and keeps its own slice, so K processes of
B/K images follow the single-process run of batch B up to floating-point reduction order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_size: int) -> slice:
        """This rank's contiguous part of a global batch."""
        if global_size % self.world:
            raise ValueError(f"batch size {global_size} is not divisible by the {self.world} processes")
        part = global_size // self.world
        return slice(self.rank * part, (self.rank + 1) * part)


def setup(device: str) -> tuple[DistInfo, str]:
    """Join the job ``torchrun`` started (gloo on CPU, nccl on CUDA); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world, local), device


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The module to run forward/backward through: DDP when several processes train."""
    if not info.enabled:
        return model
    if device.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU each process normalises its own slice
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean_across(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise mean over ranks (identity for one process)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world
    return values


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
