"""Where a job writes: `output_dir`, or Hydra's run/sweep directory of the job."""

from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from launcher.distributed import World
from launcher.errors import ConfigError


def resolve_output_dir(cfg: DictConfig, world: World) -> Path:
    """Rank 0 decides and broadcasts: ranks started a second apart would see different Hydra dirs."""
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
