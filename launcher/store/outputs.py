"""Where a job writes: `output_dir`, or Hydra's run/sweep directory of the job.

Hydra's record of the job (`.hydra/`: the config, Hydra's config, the overrides) is written here,
not by Hydra (conf/config.yaml sets `hydra.output_subdir: null`): Hydra writes it before the task
runs, which would overwrite the record of a run whose directory a training run then refuses
(launcher/store/claim.py). No torch at import: the checks before any work use `check_output_dir`.
"""

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.store.claim import claim

if TYPE_CHECKING:
    from launcher.distributed import World

HYDRA_RECORD = ".hydra"


def resolve_output_dir(cfg: DictConfig, world: "World") -> Path:
    """Rank 0 decides and broadcasts: ranks started a second apart would see different Hydra dirs."""
    import torch.distributed as dist  # (checks import this module before any torch is needed)

    chosen = [str(_local_choice(cfg))] if world.is_main else [None]
    if world.size > 1:
        dist.broadcast_object_list(chosen, src=0)
    path = Path(chosen[0])
    if world.is_main:
        path.mkdir(parents=True, exist_ok=True)
        record_hydra_job(cfg, path)
    return path


@contextmanager
def claimed_output_dir(cfg: DictConfig, world: "World") -> Iterator[Path]:
    """A training run's output directory, locked for the run and checked by the directory rule
    (launcher/store/claim.py) before anything is written in it; a refusal is one ConfigError on every rank."""
    from launcher.distributed import on_rank0_then_all

    lock = None

    def claim_on_rank0() -> str:
        nonlocal lock
        path = _local_choice(cfg)
        lock = claim(cfg, path)
        return str(path)

    try:
        path = Path(on_rank0_then_all(claim_on_rank0, world))
        if world.is_main:
            record_hydra_job(cfg, path)
        yield path
    finally:
        if lock is not None:
            lock.release()


def record_hydra_job(cfg: DictConfig, path: Path) -> None:
    """Write Hydra's record of this job (without secrets) and its log into `path`, the job's output
    directory: with an explicit output_dir under -m or SLURM, Hydra's own directory for the job is
    another one (<sweep dir>/<point>)."""
    from hydra.core.hydra_config import HydraConfig

    from launcher.training.loggers import scrub

    if not HydraConfig.initialized():
        return
    keep_job_log_in(path)
    hydra_cfg = HydraConfig.instance().cfg
    record = path / HYDRA_RECORD
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        OmegaConf.save(OmegaConf.create(scrub(OmegaConf.to_container(node, resolve=False))), record / name)


def keep_job_log_in(path: Path) -> None:
    """Hydra's job log (`hydralm.log`, its file handler on the root logger) also written in `path`,
    when Hydra's handler writes elsewhere. Ranks other than 0 have no job log."""
    root = logging.getLogger()
    hydra_logs = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not hydra_logs:
        return
    target = (path / Path(hydra_logs[0].baseFilename).name).absolute()
    if any(Path(h.baseFilename) == target for h in hydra_logs):
        return
    handler = logging.FileHandler(target)
    handler.setFormatter(hydra_logs[0].formatter)
    handler.setLevel(hydra_logs[0].level)
    root.addHandler(handler)


def _local_choice(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("output_dir must be set when the task is called outside `python -m launcher`")


def check_output_dir(path, key: str = "output_dir") -> None:
    """Before any work: `path` is a directory hydralm can create or write into (tried with a
    directory made and removed at once where it would be created)."""
    if path is None:
        return
    if not str(path).strip():
        raise ConfigError(f"{key}={str(path)!r} is empty: name a directory, or leave {key} unset for "
                          "Hydra's outputs/<date>/<time>/")
    target = Path(path).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is under a file ({existing})"
        raise ConfigError(f"{key}={path} {where}, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hydralm-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{key}={path} cannot be written: {existing} does not accept new directories "
                          f"({err.strerror})") from None
