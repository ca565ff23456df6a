"""Every check that runs before any expensive work (model load, preprocessing, process groups).

Types and key names are enforced by the schema. Each group's value checks live beside the code
they protect (`check_*` in its module); this module calls them in order and keeps only the checks
that span groups. Each failure is one ConfigError naming the key.
"""

from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig

from launcher.errors import ConfigError


def check_config(cfg: DictConfig) -> None:
    if cfg.task.uses_model:
        _check_training_run(cfg)
    if cfg.task.check is not None:
        get_method(cfg.task.check)(cfg)


def _check_training_run(cfg: DictConfig) -> None:
    from launcher.checkpoint import check_before_loading
    from launcher.data import check_data
    from launcher.loggers import check_loggers
    from launcher.losses import check_loss
    from launcher.lora import check_peft, lora_enabled
    from launcher.modeling import check_model, read_hf_config
    from launcher.optim import check_optimizer, check_scheduler
    from launcher.run_dir import check_resume, is_training_checkpoint
    from launcher.sharding import check_sharding
    from launcher.task_model import model_config
    from launcher.trainer import check_train

    check_train(cfg.train)
    check_scheduler(cfg.scheduler)
    check_sharding(cfg)
    check_data(cfg)
    check_resume(cfg.resume)
    for key in ("resume", "checkpoint"):
        if cfg[key] not in (None, "auto", "never") and is_training_checkpoint(Path(cfg[key])):
            check_before_loading(Path(cfg[key]), key)
    if cfg.checkpoint is not None and not is_training_checkpoint(Path(cfg.checkpoint)):
        read_hf_config(cfg.checkpoint, "checkpoint")
    hf_config = check_model(model_config(cfg), cfg.train.max_seq_len, cfg.task.trains)
    check_loss(cfg.train, hf_config)
    check_optimizer(cfg.optimizer)
    check_peft(cfg.peft, hf_config, cfg.task.name)
    if cfg.export.merge_lora and not lora_enabled(cfg.peft):
        raise ConfigError("export.merge_lora=true needs peft=lora (there are no adapters to merge)")
    check_loggers(cfg.logger)
