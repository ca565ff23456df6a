"""The process group every task runs in: world size 1 when started plainly, torchrun's or a
SLURM job's (through submitit) otherwise."""

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from launcher.errors import ConfigError, RunStopped

T = TypeVar("T")


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


# A job without process groups (task=preprocess, single-process tools and tests).
ONE_PROCESS = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@contextmanager
def distributed(backend: str = "auto") -> Iterator[World]:
    """Join (or create) the default process group and tear it down afterwards."""
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


def on_rank0_then_all(work: Callable[[], T], world: World) -> T:
    """Run `work` on rank 0 alone and hand its result to every rank. A ConfigError or RunStopped
    on rank 0 is raised on every rank (each exits with its one line), so no rank waits for a
    rank 0 that gave up."""
    if world.size == 1:
        return work()
    outcome = [None]
    if world.is_main:
        try:
            outcome = [("ok", work())]
        except (ConfigError, RunStopped) as err:
            outcome = [("raise", err)]
        except BaseException as err:
            dist.broadcast_object_list([("crash", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "raise":
        raise value
    if status == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# ---------------------------------------------------------------- ranks of a SLURM job (submitit)


def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ and "SUBMITIT_EXECUTOR" in os.environ


def submitit_environment() -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT of this submitit task:
    there is no torchrun inside a SLURM job, submitit's JobEnvironment knows the ranks."""
    import submitit

    job = submitit.JobEnvironment()
    job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": str(job.global_rank),
        "LOCAL_RANK": str(job.local_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
        "MASTER_ADDR": job.hostnames[0],
        # One port per job (and per requeue: the previous incarnation's socket may linger).
        "MASTER_PORT": str(20000 + (job_id * 7 + int(os.environ.get("SLURM_RESTART_COUNT", "0"))) % 20000),
    }
