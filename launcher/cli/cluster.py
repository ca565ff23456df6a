"""SLURM through hydra-submitit-launcher: checks of a request before anything is queued.

A job is `cluster.nodes` x `cluster.tasks_per_node` submitit tasks, one per GPU; each task is one
rank (launcher/distributed.py derives the ranks from submitit; launcher/training/preemption.py handles
the requeue signal). This module imports no torch: it runs in the submitting process.
"""

import subprocess
from typing import Optional

from omegaconf import DictConfig

from launcher.errors import ConfigError

# submitit's SLURM launcher as hydra-submitit-launcher spells it, and as conf/hydra/launcher/hydralm_slurm.yaml does
SLURM_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                   "hydra_plugins.hydralm.slurm_launcher.SlurmJobsLauncher")
PRESET_LAUNCHER = "hydralm_slurm"  # conf/hydra/launcher/: submitit's SLURM launcher filled from `cluster`


def check_launcher_choice(choices: DictConfig) -> None:
    """A cluster preset and the launcher it fills come together: another launcher named on the
    command line (`hydra/launcher=submitit_slurm`) would win over the preset's and submit with
    submitit's defaults (60 min, the requeue signal at 120 s), dropping every `cluster.*` key."""
    cluster, launcher = choices.get("cluster"), choices.get("hydra/launcher")
    if cluster is not None and launcher != PRESET_LAUNCHER:
        raise ConfigError(
            f"hydra/launcher={launcher} drops the cluster={cluster} preset (its partition, time limit, requeue "
            f"signal and requeues): cluster={cluster} already selects hydra/launcher={PRESET_LAUNCHER}, so leave "
            f"hydra/launcher out, and set submitit options as hydra.launcher.<key>=...")
    if cluster is None and launcher == PRESET_LAUNCHER:
        raise ConfigError(f"hydra/launcher={PRESET_LAUNCHER} is filled from a cluster preset: choose one with "
                          f"cluster=<name> (conf/cluster/: local, vector) instead of hydra/launcher")


# ---------------------------------------------------------------- before submitting
# launcher/cli/validate.py's ChecksBeforeWork calls these for a SLURM launcher, after the config checks
# of every sweep point and before the launcher queues anything.


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

