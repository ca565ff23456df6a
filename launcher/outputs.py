"""Where a job writes: `output_dir`, or Hydra's run/sweep directory of the job."""

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from launcher.errors import ConfigError

if TYPE_CHECKING:
    from launcher.distributed import World


def resolve_output_dir(cfg: DictConfig, world: "World") -> Path:
    """Rank 0 decides and broadcasts: ranks started a second apart would see different Hydra dirs."""
    import torch.distributed as dist  # (checks import this module before any torch is needed)

    chosen = [str(_local_choice(cfg))] if world.is_main else [None]
    if world.size > 1:
        dist.broadcast_object_list(chosen, src=0)
    path = Path(chosen[0])
    if world.is_main:
        path.mkdir(parents=True, exist_ok=True)
    return path


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
