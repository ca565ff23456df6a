"""Where a job writes: `output_dir`, or Hydra's run/sweep directory of the job.

Hydra's record of the job (`.hydra/`: the config, Hydra's config, the overrides) is written here,
not by Hydra (conf/config.yaml sets `hydra.output_subdir: null`): Hydra writes it before the task
runs, which would overwrite the record of a run whose directory a training run then refuses
(launcher/store/claim.py). No torch at import: the checks before any work use `check_output_dir`.
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError
from launcher.secrets import scrub
from launcher.store.atomic import write_text
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
        record_hydra_job(cfg)
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
            record_hydra_job(cfg)
        yield path
    finally:
        if lock is not None:
            lock.release()


def record_hydra_job(cfg: DictConfig) -> None:
    """Write Hydra's record of this job into the job's directory, without secrets."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = Path(hydra_cfg.hydra.runtime.output_dir) / HYDRA_RECORD
    record.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        OmegaConf.save(OmegaConf.create(scrub(OmegaConf.to_container(node, resolve=False))), record / name)


def scrub_hydra_outputs() -> None:
    """Rewrite the files Hydra dumped for this job (.hydra/config.yaml, hydra.yaml, overrides.yaml,
    and the sweep's multirun.yaml) without secrets. Call from inside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    files = []
    if hydra_cfg.output_subdir is not None:
        subdir = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
        files += [subdir / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        files.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    for path in files:
        if not path.is_file():
            continue
        dumped = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        clean = scrub(dumped)
        if clean != dumped:
            write_text(path, OmegaConf.to_yaml(OmegaConf.create(clean)))


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
