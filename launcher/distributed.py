"""The process group every task runs in: world size 1 when started plainly, torchrun's or a
SLURM job's (through submitit) otherwise.

A stopped or wedged rank (SIGSTOP, a hung filesystem, a frozen node) must not hold the others for
torch's default half hour. Each rank of a multi-rank job beats a heartbeat into the process
group's store; a watchdog thread on every rank stops that rank, with one line naming the silent
ranks, once one of them has not beaten for `sharding.collective_timeout_s`. torch's own
collective timeout is set to twice that, a backstop for a collective that hangs while every rank
still beats (mismatched collectives).
"""

import os
import random
import sys
import threading
import time
from datetime import timedelta
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from launcher.errors import ConfigError, RunStopped

T = TypeVar("T")

# sharding.cpu_offload on CUDA: collectives of host-resident tensors (the gradient norm, the export's
# gathers) go through gloo, those of device tensors through nccl.
CPU_AND_CUDA = "cpu:gloo,cuda:nccl"


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


DEFAULT_COLLECTIVE_TIMEOUT_S = 600


@contextmanager
def distributed(backend: str = "auto", collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> Iterator[World]:
    """Join (or create) the default process group and tear it down afterwards; with more than
    one rank, a watchdog stops every rank left waiting for a silent one (`Watchdog`)."""
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
    elif backend == CPU_AND_CUDA and device.type != "cuda":
        backend = "gloo"
    owner = not dist.is_initialized()
    if owner:
        if launched:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                    timeout=timedelta(seconds=2 * collective_timeout_s))
        else:  # a world of one needs no rendezvous port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    watchdog = Watchdog(rank, size, collective_timeout_s) if owner and size > 1 else None
    try:
        yield World(rank, local_rank, size, local_size, device)
    finally:
        if watchdog is not None:
            watchdog.finish()
        if owner and dist.is_initialized():
            dist.destroy_process_group()


class Watchdog:
    """Every rank adds 1 to its counter in the process group's store every `interval` seconds
    (a thread: it beats while the rank computes, waits or saves, and stops only when the process
    is stopped or frozen). The same thread reads the others' counters: a rank whose counter has
    not moved for `timeout_s` is silent, and this rank stops with one line naming it rather than
    wait in a collective that cannot finish. A rank that left the process group cleanly says so
    and is not waited for. Counters, not clocks: hosts' clocks need not agree."""

    PREFIX = "hydralm/watchdog"

    def __init__(self, rank: int, size: int, timeout_s: float):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.interval = max(0.2, min(timeout_s / 10, 10.0))
        self.store = dist.distributed_c10d._get_default_store()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hydralm-watchdog", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.store.add(f"{self.PREFIX}/done/{self.rank}", 1)
        except Exception:  # the store's host is gone: nobody is left to wait for this rank
            pass

    def _run(self) -> None:
        last_seen = {r: (-1, time.monotonic()) for r in range(self.size) if r != self.rank}
        try:
            while not self.stop.wait(self.interval):
                self.store.add(f"{self.PREFIX}/beat/{self.rank}", 1)
                silent = self._silent(last_seen)
                if silent:
                    self._stop_this_rank(silent)
        except Exception:  # the store's host went away: torch's own timeout and torchrun take over
            return

    def _silent(self, last_seen: dict) -> list[int]:
        now, silent = time.monotonic(), []
        for other, (count, since) in list(last_seen.items()):
            if self.store.add(f"{self.PREFIX}/done/{other}", 0):
                del last_seen[other]
                continue
            current = self.store.add(f"{self.PREFIX}/beat/{other}", 0)
            if current != count:
                last_seen[other] = (current, now)
            elif now - since >= self.timeout_s:
                silent.append(other)
        return silent

    def _stop_this_rank(self, silent: list[int]) -> None:
        ranks = ", ".join(str(r) for r in silent)
        print(f"hydralm: error: rank {ranks} stopped responding (no heartbeat for {self.timeout_s:g} s, "
              f"sharding.collective_timeout_s={self.timeout_s:g}; stopped, frozen or its host hung): rank "
              f"{self.rank} stops instead of waiting for it in a collective", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread is blocked in a collective that will not return


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


def launch_world_size() -> int:
    """The number of processes of this launch (torchrun's or a SLURM job's), before the group forms."""
    if "WORLD_SIZE" not in os.environ and in_submitit_job():
        import submitit

        return submitit.JobEnvironment().num_tasks
    return _env_int("WORLD_SIZE", 1)


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
