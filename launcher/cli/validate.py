"""Every check that runs before any expensive work (model load, preprocessing, process groups).

Types and key names are enforced by the schema. Each group's value checks live beside the code
they protect (`check_*` in its module); this module calls them in order and keeps only the checks
that span groups. Each failure is one ConfigError naming the key.

`ChecksBeforeWork` runs them before Hydra creates a run or sweep directory (a refused run leaves
nothing behind), for every point of a sweep before the first one starts or is queued. Where the
job will run on another machine (SLURM), or with task=validate, only what needs neither the model
nor the machine's devices is checked here; the job checks the rest when it starts.
"""

import copy
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, flag_override, open_dict, read_write

from launcher.errors import ConfigError

VALIDATE = "validate"  # task=validate: check, print one line per point, run nothing
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_config(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """`on_this_machine=False`: the job runs elsewhere or is only validated, so the checks of
    this machine's devices and of the model's modules are left to the job. Checks whose modules
    import no torch come first: a bad path or key is refused without paying for torch."""
    from launcher.store.outputs import check_not_a_run, check_output_dir
    from launcher.store.run_dir import check_resume

    with flag_override(cfg, "readonly", True):  # torch-free checks first: no torch for a bad path
        check_output_dir(cfg.output_dir)
        if cfg.task.uses_model and not cfg.task.trains and cfg.task.name != VALIDATE:  # export, evaluate
            check_not_a_run(cfg.output_dir)
        if cfg.task.uses_model:
            check_resume(cfg.resume)
    if cfg.task.uses_model:
        normalise_config(cfg)  # imports the data machinery (torch)
    with flag_override(cfg, "readonly", True):  # the checks read; only normalise_config writes
        if cfg.task.uses_model:
            _check_training_run(cfg, on_this_machine)
        if cfg.task.check is not None:
            get_method(cfg.task.check)(cfg)


def normalise_config(cfg: DictConfig) -> None:
    """The one place the composed config is rewritten: aliases (VectorLM's spellings) become the
    canonical names and format-dependent defaults are filled in. Idempotent."""
    from launcher.data.preprocessing import normalise_data
    from launcher.model.sharding import normalise_sharding
    from launcher.training.optim import normalise_scheduler

    with open_dict(cfg):
        normalise_sharding(cfg.sharding)
        normalise_scheduler(cfg.scheduler)
        normalise_data(cfg.data)


def _check_training_run(cfg: DictConfig, on_this_machine: bool) -> None:
    from launcher.training.loggers import check_loggers

    check_loggers(cfg.logger)

    from launcher.data.preprocessing import check_data
    from launcher.model.lora import check_lora_targets, check_peft, lora_enabled
    from launcher.model.losses import check_loss
    from launcher.model.precision import check_precision
    from launcher.model.modeling import check_attention_device, check_model, read_hf_config
    from launcher.model.sharding import check_launch, check_sharding
    from launcher.model.task_model import lora_settings, model_config
    from launcher.store.run_dir import is_training_checkpoint
    from launcher.training.checkpoint import check_before_loading
    from launcher.training.optim import check_optimizer, check_scheduler
    from launcher.training.trainer import check_length_change, check_train

    check_train(cfg.train)
    check_length_change(cfg)
    check_scheduler(cfg.scheduler)
    check_sharding(cfg)
    check_data(cfg)
    for key in ("resume", "checkpoint"):
        if cfg[key] not in (None, "auto", "never") and is_training_checkpoint(Path(cfg[key])):
            check_before_loading(Path(cfg[key]), key)
    if cfg.checkpoint is not None and not is_training_checkpoint(Path(cfg.checkpoint)):
        read_hf_config(cfg.checkpoint, "checkpoint")
    hf_config = check_model(model_config(cfg), cfg.train.max_seq_len)
    check_loss(cfg.train, hf_config)
    check_optimizer(cfg.optimizer)
    check_precision(cfg.train, cfg.optimizer)
    check_peft(cfg.peft, cfg.task)
    if cfg.export.merge_lora and not lora_enabled(cfg.peft):  # the adapters may come from the checkpoint
        if cfg.checkpoint is None or lora_settings(Path(cfg.checkpoint)) is None:
            raise ConfigError("export.merge_lora=true needs peft=lora, or checkpoint= a peft=lora run's training "
                              "checkpoint (there are no adapters to merge)")
    if on_this_machine:
        check_launch(cfg)
        check_attention_device(cfg.model, cfg.task.trains)
        check_lora_targets(cfg.peft, model_config(cfg))


# ---------------------------------------------------------------------- before Hydra's directories


class ChecksBeforeWork(Callback):
    """Hydra callback (conf/config.yaml). Hydra calls on_run_start / on_multirun_start after
    composing the config and before it creates a run directory (run_job) or a sweep directory
    (the sweeper), so a refusal here leaves nothing on disk."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        validating = config.task.name == VALIDATE
        with _refusals():
            _check_job(config, on_this_machine=not validating)
            _check_job_dir(config, "hydra.run.dir")
        if validating:
            print(f"hydralm: ok: {_described(config.hydra.overrides.task)}", flush=True)
            sys.exit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from launcher.cli.cluster import SLURM_LAUNCHERS, check_launcher_choice, check_request, query_partition

        validating = config.task.name == VALIDATE
        launcher = config.hydra.launcher
        here = launcher.get("_target_") == BASIC_LAUNCHER and not validating
        with _refusals():
            check_launcher_choice(config.hydra.runtime.choices)
            _check_job_dir(config, "hydra.sweep.dir")
            points = sweep_points(config)
        for index, overrides in enumerate(points):
            with _refusals(f"sweep point #{index} ({_described(overrides)}): ", overrides):
                _check_job(_point_config(config, overrides, index), on_this_machine=here)
            if validating:
                print(f"hydralm: ok: #{index} {_described(overrides)}", flush=True)
        if launcher.get("_target_") in SLURM_LAUNCHERS:
            with _refusals():
                check_request(launcher, query_partition(launcher.get("partition")))
        if validating:
            sys.exit(0)


@contextmanager
def _refusals(what: str = "", overrides=None):
    """A ConfigError, or Hydra's error composing a sweep point, ends the command in one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from launcher.cli.console import describe_composition_error, refuse

    try:
        yield
    except ConfigError as err:
        refuse(err, what)
    except (HydraException, OmegaConfBaseException) as err:
        refuse(describe_composition_error(err, overrides), what)


def _check_job(config: DictConfig, on_this_machine: bool) -> None:
    """check_config on what the task function of `config` (with its `hydra` node) will get."""
    from hydra.core.hydra_config import HydraConfig

    from launcher.secrets import learn_secrets

    learn_secrets(config.hydra.overrides.task)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(config)  # for ${hydra:...} in the task's keys
    try:
        check_config(_task_config(config), on_this_machine)
    finally:
        HydraConfig.instance().cfg = saved


def _check_job_dir(config: DictConfig, key: str) -> None:
    """Hydra's directory for the job(s) can be made (an explicit output_dir is checked with the rest)."""
    from launcher.store.outputs import check_output_dir

    if config.get("output_dir") is None:
        check_output_dir(OmegaConf.select(config, key), key)


def _task_config(config: DictConfig) -> DictConfig:
    """What the task function will get: the config without its `hydra` node (as Hydra's run_job)."""
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def sweep_points(config: DictConfig) -> list[list[str]]:
    """The overrides of every job of a -m run, as Hydra's basic sweeper expands them. Other
    sweepers choose their points as they go: their base config is checked, each trial again in
    its job."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    arguments = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    params = config.hydra.sweeper.get("params") or {}
    if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(
            [f"{key}={value}" for key, value in params.items()] + arguments)
        return BasicSweeper.split_arguments(overrides, None)[0]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return [[text for text, o in zip(arguments, parsed) if not o.is_sweep_override()]]


def _point_config(config: DictConfig, overrides: list[str], index: int) -> DictConfig:
    from hydra.core.global_hydra import GlobalHydra

    point = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(point):
        point.hydra.job.id = point.hydra.job.num = index
    return point


def _described(overrides) -> str:
    return " ".join(str(o) for o in overrides) or "the default config"
