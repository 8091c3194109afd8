"""Data-parallel training under torchrun: one process per device, gradients averaged by DDP.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a job is a single process
and nothing here starts a process group. The backend follows the device: NCCL on
CUDA, gloo on CPU (which is how the tests run two ranks on this machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> Dist:
    """Join the torchrun process group if launched by torchrun; a single process otherwise."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return info


def current() -> Dist:
    """The process group this process is in (a single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a per-rank tensor on the training device (in place; itself on one rank)."""
    if current().world_size > 1:
        dist.all_reduce(t)
    return t


def control_group():
    """The process group for the loop's host-side agreements (the preemption flag each step, bad-clip
    counts, the wait for a preemption checkpoint): gloo, so they move CPU tensors and never wait on
    the device. The default group where it is gloo already; a new one (every rank calls this) under NCCL."""
    if current().world_size == 1:
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def barrier(group=None) -> None:
    if current().world_size > 1:
        dist.barrier(group=group)


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
