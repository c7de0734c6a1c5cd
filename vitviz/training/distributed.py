"""Data-parallel plumbing: one process per device when launched by ``torchrun``, a no-op otherwise.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; we then join a process group (NCCL
on GPUs, gloo on CPU), shard every epoch's seeded permutation across ranks, sum metrics over ranks
and let rank 0 alone write files.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vitviz.errors import TrainingError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly trivial) data-parallel group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (and return it); identity in a single process."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor, in rank order."""
        if not self.enabled:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of a permutation: padded (by wrapping) to a multiple of the world size,
        then every ``world_size``-th element, so every rank takes the same number of steps."""
        if not self.enabled:
            return indices
        n = indices.numel()
        padded = -(-n // self.world_size) * self.world_size
        if padded > n:
            indices = torch.cat([indices, indices[: padded - n]])
        return indices[self.rank :: self.world_size]


def setup(device_kind: str) -> DistEnv:
    """Join the process group ``torchrun`` describes in the environment (no-op when not launched so)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise TrainingError("this PyTorch build has no torch.distributed; run without torchrun.")
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank)


def teardown(env: DistEnv) -> None:
    """Leave the process group this module joined."""
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
