"""Where metric rows go besides metrics.jsonl (the `logger` group): wandb and TensorBoard.

Each `logger.<name>` node names its class with `_target_`; its other keys are the class's
keyword arguments. A logger of your own is one class (subclass Logger) and one YAML file in
conf/logger/. Loggers live on rank 0 only and see a row only when metrics.jsonl does, once per
logging interval, so they add nothing to the training step. The run config they receive passes
through launcher/secrets.py's `scrub` first.
"""

import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launcher.errors import ConfigError, check_arguments
from launcher.registry import imported_class
from launcher.secrets import scrub, scrubbed_config

WANDB_RUN_ID_FILE = "wandb_run_id"
# wandb.init arguments hydralm sets itself; `config` is always the composed config.
WANDB_RESERVED = ("config",)


def open_loggers(cfg: DictConfig, output_dir: Path) -> list:
    """The loggers `cfg.logger` selects (call on rank 0 only)."""
    loggers = []
    for name, node in cfg.logger.items():
        options = OmegaConf.to_container(node, resolve=True)
        loggers.append(imported_class(f"logger.{name}._target_", options.pop("_target_"))(cfg, output_dir, **options))
    return loggers


def check_loggers(logger: DictConfig) -> None:
    """Each logger's class imports and takes its keys; before any work."""
    for name, node in logger.items():
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if target is None:
            raise ConfigError(f"logger.{name}._target_ must name a logger class, e.g. launcher.training.loggers.WandbLogger")
        imported_class(f"logger.{name}._target_", target).check(name, {k: v for k, v in node.items() if k != "_target_"})


class Logger:
    """A destination for metric rows besides metrics.jsonl."""

    def __init__(self, cfg: DictConfig, output_dir: Path):
        self.cfg, self.output_dir = cfg, output_dir

    @classmethod
    def check(cls, name: str, options: dict) -> None:
        """Before any work: `options` are keyword arguments of this class."""
        check_arguments(f"logger.{name}", options, cls.__init__, cls.__name__, ("self", "cfg", "output_dir"))

    def log(self, row: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass



def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class WandbLogger(Logger):
    """One wandb run per output directory: its id is kept in `<output_dir>/wandb_run_id`, so a
    resumed or requeued job (same output_dir) continues the same run. Every option is passed to
    wandb.init (VectorLM's `wandb_config`)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, **init_options):
        import wandb

        super().__init__(cfg, output_dir)
        with _scrubbed_argv():  # wandb records the command line with the run
            self.run = wandb.init(**wandb_init_kwargs(cfg, output_dir))

    @classmethod
    def check(cls, name: str, options: dict) -> None:
        import wandb

        check_arguments(f"logger.{name}", options, wandb.init, "wandb.init", WANDB_RESERVED)

    def log(self, row: dict) -> None:
        self.run.log(_numbers(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


@contextmanager
def _scrubbed_argv():
    argv = sys.argv
    sys.argv = [argv[0], *scrub(argv[1:])]
    try:
        yield
    finally:
        sys.argv = argv


def wandb_init_kwargs(cfg: DictConfig, output_dir: Path) -> dict:
    """hydralm's defaults, then `logger.wandb` (the user's keys win), then the composed config."""
    defaults = {"dir": str(output_dir), "id": wandb_run_id(output_dir), "resume": "allow", **_sweep_grouping()}
    user = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    user.pop("_target_", None)
    tags = list(dict.fromkeys([*cfg.tags, *(user.pop("tags", None) or [])]))  # the run's `tags`, then wandb's own
    return {**defaults, **user, **({"tags": tags} if tags else {}), "config": scrubbed_config(cfg)}


def wandb_run_id(output_dir: Path) -> str:
    path = output_dir / WANDB_RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def _sweep_grouping() -> dict:
    """In a sweep (-m): the runs share a wandb group (the sweep directory), named by their overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    return {"group": str(hydra_cfg.sweep.dir), "name": scrub(hydra_cfg.job.override_dirname) or f"job{hydra_cfg.job.num}"}


class TensorboardLogger(Logger):
    """Scalars under their metrics.jsonl names at the optimizer step; the config as text.
    Event files go to `log_dir` (default <output_dir>/tensorboard)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, log_dir: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(cfg, output_dir)
        self.writer = SummaryWriter(log_dir or str(output_dir / "tensorboard"))
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(scrubbed_config(cfg)))
        self.writer.add_text("config", "```\n" + config_yaml + "\n```")
        if cfg.tags:
            self.writer.add_text("tags", ", ".join(cfg.tags))

    def log(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

