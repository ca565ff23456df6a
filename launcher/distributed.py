"""The process group every task runs in: world size 1 when started plainly, torchrun's otherwise."""

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    local_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@contextmanager
def distributed(backend: str = "auto") -> Iterator[World]:
    """Join (or create) the default process group and tear it down afterwards."""
    from launcher.cluster import in_submitit_job, submitit_environment

    if "RANK" not in os.environ and in_submitit_job():  # a SLURM task: no torchrun, submitit knows the ranks
        os.environ.update(submitit_environment())
    launched = "RANK" in os.environ
    rank, size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    owner = not dist.is_initialized()
    if owner:
        if launched:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # a world of one needs no rendezvous port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield World(rank, local_rank, size, local_size, device)
    finally:
        if owner and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical init and data order everywhere."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
