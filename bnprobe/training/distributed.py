"""Data-parallel training across processes started by torchrun (`bnprobe train ... --ddp`).

Each process trains on its own shard of every epoch's permutation (the permutation itself is the same
on every rank) and augments it from its own stream, seeded per epoch by `augmentation_seed`; gradients
are averaged by DistributedDataParallel; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bnprobe.core.errors import BnprobeError


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: torch.device) -> "Process":
        """Join the process group torchrun describes in the environment: NCCL on CUDA, gloo on CPU."""
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise BnprobeError("--ddp needs torchrun's environment: torchrun --nproc_per_node N -m bnprobe train ...")
        process = cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(process.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return process

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's augmentation stream in one epoch (0-based) of a multi-process run.

    Derived from (seed, epoch, rank), never carried over from the previous epoch, so a resumed run reseeds
    every rank exactly as the uninterrupted run did and no rank's generator state needs saving."""
    digest = hashlib.sha256(f"bnprobe-augment/{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
