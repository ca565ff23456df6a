"""SLURM through hydra-submitit-launcher: rank environment, preemption, checks before submitting.

A job is `cluster.nodes` x `cluster.tasks_per_node` submitit tasks, one per GPU; each task is one
rank. There is no torchrun inside the job: `submitit_environment` derives torch.distributed's
variables from submitit's JobEnvironment.

On the signal submitit forwards (USR2, `signal_delay_s` before the time limit, or on preemption)
every rank finishes its optimizer step, the ranks write a checkpoint together, and rank 0 hands
over to submitit's own handler, which resubmits the same Hydra job (the plugin's `checkpoint`)
and requeues it; the requeued job finds the checkpoint in the same output directory
(`resume=auto`) and continues exactly where it stopped.
"""

import os
import signal
import subprocess
import sys
from typing import Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from launcher.errors import ConfigError

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


# ---------------------------------------------------------------- inside the job


def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ and "SUBMITIT_EXECUTOR" in os.environ


def submitit_environment() -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT of this submitit task."""
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


class Preemption:
    """Turns submitit's requeue signal into a checkpoint at the next step boundary.

    Outside a submitit job it does nothing: `requested()` is always False.
    """

    def __init__(self, world):
        self.world = world
        self.received: Optional[int] = None
        self.submitit_handler = None
        if in_submitit_job():
            import submitit

            signum = submitit.JobEnvironment._usr_sig()
            self.submitit_handler = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective when active: true on every rank once any rank got the signal."""
        if self.submitit_handler is None:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], device=self.world.device)
        if self.world.size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> None:
        """After the checkpoint: rank 0 lets submitit resubmit the job and requeue it; it exits."""
        from launcher.distributed import barrier

        barrier()
        print(f"hydralm: rank {self.world.rank} stopping for requeue after the checkpoint", flush=True)
        if self.world.is_main:
            self.submitit_handler(self.received or signal.SIGUSR2, None)  # requeues, then sys.exit
        sys.exit(-1)


# ---------------------------------------------------------------- before submitting


class SubmissionChecks(Callback):
    """Hydra callback (conf/config.yaml): checks a SLURM request against the partition before
    the launcher queues anything."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.launcher
        if launcher.get("_target_") != SLURM_LAUNCHER:
            return
        try:
            check_request(launcher, query_partition(launcher.get("partition")))
        except ConfigError as err:
            print(f"hydralm: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


def query_partition(partition: Optional[str]) -> list[dict]:
    """One row per node of `partition` (default: the cluster's default partition), from sinfo."""
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], capture_output=True, text=True,
                                timeout=30)
    except FileNotFoundError:
        raise ConfigError("hydra/launcher=submitit_slurm needs SLURM's sinfo on PATH (run on a login node)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError("sinfo did not answer within 30 s: is slurmctld reachable?") from None
    if result.returncode != 0:
        raise ConfigError(f"sinfo failed: {result.stderr.strip()}")
    return parse_sinfo(result.stdout, partition)


def parse_sinfo(text: str, partition: Optional[str]) -> list[dict]:
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    names = sorted({p.rstrip("*") for p, *_ in rows})
    if partition is None:
        partition = next((p.rstrip("*") for p, *_ in rows if p.endswith("*")), None)
        if partition is None:
            raise ConfigError(f"cluster.partition must be set: this cluster has no default partition ({', '.join(names)})")
    nodes = [
        {"name": node, "cpus": int(cpus), "mem_mb": int(mem.rstrip("+")), "gpus": _gpu_count(gres)}
        for p, node, cpus, mem, gres in rows
        if p.rstrip("*") == partition
    ]
    if not nodes:
        raise ConfigError(f"cluster.partition={partition} is not a partition of this cluster; valid choices: {', '.join(names)}")
    return nodes


def _gpu_count(gres: str) -> int:
    """`gpu:4`, `gpu:a40:4(S:0-1)`, `(null)` -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def check_request(launcher: DictConfig, nodes: list[dict]) -> None:
    """What sbatch would reject late or queue forever: too many nodes, CPUs, memory, GPUs; a
    requeue signal that would fire at once."""
    timeout_s = launcher.timeout_min * 60
    if launcher.signal_delay_s >= timeout_s:
        raise ConfigError(
            f"cluster.signal_delay_s={launcher.signal_delay_s} must be shorter than the time limit "
            f"cluster.time_min={launcher.timeout_min} ({timeout_s} s): the requeue signal would fire at the start"
        )
    partition = f"partition with {len(nodes)} node(s)"
    if launcher.nodes > len(nodes):
        raise ConfigError(f"cluster.nodes={launcher.nodes} exceeds the {partition}")
    cpus = max(n["cpus"] for n in nodes)
    wanted_cpus = launcher.tasks_per_node * (launcher.cpus_per_task or 1)
    if wanted_cpus > cpus:
        raise ConfigError(
            f"cluster.tasks_per_node x cluster.cpus_per_task = {wanted_cpus} CPUs exceeds the {cpus} CPUs per node "
            f"of the {partition}"
        )
    mem_mb = max(n["mem_mb"] for n in nodes)
    if launcher.mem_gb is not None and launcher.mem_gb * 1024 > mem_mb:
        raise ConfigError(f"cluster.mem_gb={launcher.mem_gb} exceeds the {mem_mb // 1024} GB per node of the {partition}")
    gpus = max(n["gpus"] for n in nodes)
    if (launcher.gpus_per_node or 0) > gpus:
        raise ConfigError(f"cluster.gpus_per_node={launcher.gpus_per_node} exceeds the {gpus} GPUs per node of the {partition}")
