"""Checks that run before any expensive work (model load, preprocessing, process groups).

Types and key names are already enforced by the schema; these are the value ranges, paths and
combinations the schema cannot express. Each failure is one ConfigError naming the key.
"""

import importlib.util
import inspect
import json
import logging
import os
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from launcher.errors import ConfigError, choice_error

log = logging.getLogger("hydralm")

SHARDING_STRATEGIES = ("NO_SHARD", "FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")
ATTENTION_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
DATA_SOURCES = ("pydoc", "disk", "files", "hub", "preprocessed")
PACKING_TYPES = ("full", "partial")
SCHEDULER_ALIASES = {"plataeu-with-warmup": "plateau_with_warmup", "plateau-with-warmup": "plateau_with_warmup"}


def check_config(cfg: DictConfig) -> None:
    if cfg.task.name == "report":  # reads finished runs: no model, data or optimizer involved
        _check_report(cfg.report)
        return
    _normalise(cfg)
    _check_train(cfg.train)
    _check_scheduler(cfg.scheduler)
    _check_sharding(cfg.sharding)
    _check_world(cfg)
    _check_data(cfg.data, cfg.train.max_seq_len)
    _check_resume(cfg.resume)
    if cfg.checkpoint is not None and not _is_training_checkpoint(cfg.checkpoint):
        _read_hf_config(cfg.checkpoint, "checkpoint")
    _check_model(model_config(cfg), cfg.train.max_seq_len)
    _check_optimizer(cfg.optimizer)
    _check_peft(cfg)
    _check_loggers(cfg.logger)


def model_config(cfg: DictConfig) -> DictConfig:
    """The model a task loads: `checkpoint` when set, else `model`. An exported HF directory is
    loaded as it is; a training checkpoint gives the architecture (its `hf/` config, random init:
    the task then loads the weights) and the tokenizer."""
    if cfg.checkpoint is None:
        return cfg.model
    model = cfg.model.copy()
    with open_dict(model):
        if _is_training_checkpoint(cfg.checkpoint):
            from launcher.checkpoint import hf_dir as checkpoint_hf_dir

            hf_dir = checkpoint_hf_dir(Path(cfg.checkpoint))
            hf_config = json.loads((hf_dir / "config.json").read_text())
            for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
                hf_config.pop(key, None)
            model.path, model.tokenizer, model.config = None, str(hf_dir), hf_config
            model.pad_vocab_to_multiple_of = 1  # hf/config.json holds the trained vocabulary size
        else:
            model.path = model.tokenizer = cfg.checkpoint
            model.config = None
    return model


def _is_training_checkpoint(path: str) -> bool:
    from launcher.checkpoint import is_complete  # imports torch: only when a checkpoint is named

    return is_complete(Path(path))


def scheduler_names() -> list[str]:
    from transformers import SchedulerType

    from launcher.optim import PLATEAU_WITH_WARMUP

    return [s.value for s in SchedulerType] + [PLATEAU_WITH_WARMUP]


def _normalise(cfg: DictConfig) -> None:
    """Accept the VectorLM spellings: upper-case strategies, `plataeu-with-warmup`."""
    with open_dict(cfg):
        cfg.sharding.strategy = str(cfg.sharding.strategy).upper()
        cfg.scheduler.name = SCHEDULER_ALIASES.get(cfg.scheduler.name, cfg.scheduler.name)


def _at_least(value, minimum, key: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def _check_train(train: DictConfig) -> None:
    _at_least(train.epochs, 1, "train.epochs")
    _at_least(train.max_steps, 1, "train.max_steps")
    _at_least(train.gradient_accumulation_steps, 1, "train.gradient_accumulation_steps")
    _at_least(train.logging_steps, 1, "train.logging_steps")
    _at_least(train.max_seq_len, 8, "train.max_seq_len")
    _at_least(train.max_eval_batches, 1, "train.max_eval_batches")
    _at_least(train.activation_checkpointing_every, 1, "train.activation_checkpointing_every")
    if train.max_grad_norm is not None and train.max_grad_norm <= 0:
        raise ConfigError(f"train.max_grad_norm={train.max_grad_norm} must be > 0 (or null to disable clipping)")
    if not 0 < train.save_frequency <= 1:
        raise ConfigError(f"train.save_frequency={train.save_frequency} must be in (0, 1]")
    _at_least(train.save_steps, 1, "train.save_steps")
    _at_least(train.keep_last_n, 1, "train.keep_last_n")


def _check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    if not Path(resume).is_dir():
        raise ConfigError(f"resume={resume} must be auto, never, or an existing checkpoint directory")
    if not _is_training_checkpoint(resume):
        raise ConfigError(f"resume={resume} is not a complete training checkpoint (no COMPLETE marker; "
                          f"an interrupted save leaves a .partial directory that is never used)")


def _check_scheduler(scheduler: DictConfig) -> None:
    if not 0 <= scheduler.warmup_ratio <= 1:
        raise ConfigError(f"scheduler.warmup_ratio={scheduler.warmup_ratio} must be in [0, 1]")
    names = scheduler_names()
    if scheduler.name not in names:
        raise choice_error("scheduler.name", scheduler.name, names)
    from launcher.optim import check_scheduler

    check_scheduler(scheduler)


def _check_sharding(sharding: DictConfig) -> None:
    if sharding.strategy not in SHARDING_STRATEGIES:
        raise choice_error("sharding.strategy", sharding.strategy, SHARDING_STRATEGIES)
    _at_least(sharding.shard_group_size, 1, "sharding.shard_group_size")
    if sharding.backend not in ("auto", "gloo", "nccl"):
        raise choice_error("sharding.backend", sharding.backend, ("auto", "gloo", "nccl"))


def _check_world(cfg: DictConfig) -> None:
    """What depends on the launch: world size (torchrun/SLURM env), CUDA, optional packages."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.sharding.strategy == "HYBRID_SHARD":
        group = cfg.sharding.shard_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % group:
            raise ConfigError(
                f"sharding.strategy=HYBRID_SHARD needs the world size ({world_size}) to be divisible by "
                f"sharding.shard_group_size ({group}; default: ranks per node)"
            )
    cuda = torch.cuda.is_available()
    if cfg.sharding.backend == "nccl" and not cuda:
        raise ConfigError("sharding.backend=nccl needs CUDA devices; use sharding.backend=gloo (or auto) on CPU")
    if cfg.sharding.cpu_offload and not cuda:
        raise ConfigError("sharding.cpu_offload=true offloads GPU memory to the host; it needs CUDA devices")
    if cfg.train.use_mp and not cuda:
        log.warning("train.use_mp=true on CPU: bf16 without hardware support is much slower than fp32 here")
    if cfg.model.attention == "flash_attention_2" and not (cuda and importlib.util.find_spec("flash_attn")):
        raise ConfigError(
            "model.attention=flash_attention_2 needs a CUDA device and the flash_attn package "
            "(pip install 'hydralm[flash]'); use model.attention=sdpa or auto"
        )


def _check_data(data: DictConfig, max_seq_len: int) -> None:
    if data.source not in DATA_SOURCES:
        raise choice_error("data.source", data.source, DATA_SOURCES)
    _at_least(data.train_bs, 1, "data.train_bs")
    _at_least(data.eval_bs, 1, "data.eval_bs")
    _at_least(data.eval_every, 2, "data.eval_every")
    _at_least(data.num_proc, 1, "data.num_proc")
    if data.source == "preprocessed":
        for key in ("train_ds", "eval_ds"):
            path = OmegaConf.select(data, key, throw_on_missing=False)
            if path is None or OmegaConf.is_missing(data, key):
                raise ConfigError(f"data.{key} must be set for data.source=preprocessed")
            if not Path(path).is_dir():
                raise ConfigError(f"data.{key}={path} does not exist")
        return
    _check_raw_source(data)
    _check_preprocessing(data, max_seq_len)


def _check_raw_source(data: DictConfig) -> None:
    if data.source == "pydoc":
        if data.eval_split is not None:
            raise ConfigError("data.eval_split does not apply to data.source=pydoc (eval is every data.eval_every-th topic)")
        return
    path = OmegaConf.select(data, "load_path", throw_on_missing=False)
    if path is None or OmegaConf.is_missing(data, "load_path"):
        raise ConfigError(f"data.load_path must be set for data.source={data.source}")
    if data.source == "disk" and not Path(path).is_dir():
        raise ConfigError(f"data.load_path={path} does not exist (a directory written by datasets' save_to_disk)")
    if data.source == "files":
        from launcher.corpus import file_builder, file_list

        for key, pattern in (("data.load_path", path), ("data.eval_split", data.eval_split)):
            if pattern is None:
                continue
            files = file_list(pattern)
            if not files:
                raise ConfigError(f"{key}={pattern} matches no file")
            file_builder(files, f"{key}={pattern}")


def _check_preprocessing(data: DictConfig, max_seq_len: int) -> None:
    with open_dict(data):
        if data.seperator is not None:  # VectorLM's spelling
            if data.separator is not None and data.separator != data.seperator:
                raise ConfigError(f"data.separator={data.separator!r} and its alias data.seperator={data.seperator!r} differ")
            data.separator = data.seperator
    if data.separator == "":
        raise ConfigError("data.separator must not be empty")
    if not data.data_field:
        raise ConfigError("data.data_field must name the text column")
    if data.dataset_format != "hf":
        raise choice_error("data.dataset_format", data.dataset_format, ("hf",))
    if data.packing_type is not None and data.packing_type not in PACKING_TYPES:
        raise choice_error("data.packing_type", data.packing_type, PACKING_TYPES)
    if data.truncate and data.packing_type is not None:
        raise ConfigError(
            f"data.truncate=true and data.packing_type={data.packing_type} exclude each other: "
            "truncate cuts each example to one row, packing chunks them"
        )
    _at_least(data.overlap, 0, "data.overlap")
    if data.overlap and data.packing_type is None:
        raise ConfigError(f"data.overlap={data.overlap} needs data.packing_type (full or partial)")
    chunk = max_seq_len - 2 if data.add_bos_eos_tokens else max_seq_len
    if data.overlap >= chunk:
        raise ConfigError(
            f"data.overlap={data.overlap} must be smaller than the chunk size {chunk} "
            f"(train.max_seq_len{' - 2 for BOS/EOS' if data.add_bos_eos_tokens else ''})"
        )
    if data.document_mask and data.packing_type != "full":
        raise ConfigError("data.document_mask=true needs data.packing_type=full (only full packing puts several documents in a row)")


def _check_model(model: DictConfig, max_seq_len: int) -> None:
    if model.attention not in ATTENTION_IMPLEMENTATIONS:
        raise choice_error("model.attention", model.attention, ATTENTION_IMPLEMENTATIONS)
    if model.path is None and model.config is None:
        raise ConfigError(f"model={model.name} needs model.path (a local directory with HF weights and tokenizer) "
                          f"or model.config (a random init)")
    if model.path is not None:
        _read_hf_config(model.path, "model.path")
    tokenizer = model.tokenizer or model.path
    if tokenizer is None or not Path(tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer={tokenizer} does not exist (a directory with a HF tokenizer)")
    from launcher.modeling import check_model

    check_model(model, max_seq_len)


def _read_hf_config(path: str, key: str) -> dict:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}={path} does not exist (a directory with HF weights and tokenizer)")
    config_file = Path(path) / "config.json"
    if (Path(path) / "adapter_config.json").is_file() and not config_file.is_file():
        raise ConfigError(
            f"{key}={path} is a LoRA adapter directory, not a model; use the merged model that "
            "export.merge_lora=true writes next to it (final-model-merged)"
        )
    if not config_file.is_file():
        raise ConfigError(f"{key}={path} has no config.json: not a HuggingFace model directory")
    return json.loads(config_file.read_text())


def _check_optimizer(optimizer: DictConfig) -> None:
    target = optimizer.get("_target_")
    if target is None:
        raise ConfigError("optimizer._target_ must name an optimizer class, e.g. torch.optim.AdamW")
    try:
        optimizer_class = get_class(target)
    except Exception as err:
        raise ConfigError(f"optimizer._target_={target} cannot be imported: {err}") from None
    valid = [p for p in inspect.signature(optimizer_class).parameters if p not in ("self", "params")]
    unknown = [k for k in optimizer if k != "_target_" and k not in valid]
    if unknown:
        raise ConfigError(
            f"optimizer.{unknown[0]} is not a parameter of {target}; valid parameters: {', '.join(valid)}"
        )


def _check_peft(cfg: DictConfig) -> None:
    from launcher.lora import check_peft, lora_enabled

    check_peft(cfg.peft, model_config(cfg), cfg.task.name)
    if cfg.export.merge_lora and not lora_enabled(cfg.peft):
        raise ConfigError("export.merge_lora=true needs peft=lora (there are no adapters to merge)")


def _check_loggers(logger: DictConfig) -> None:
    if logger.wandb is None:
        return
    import wandb

    from launcher.loggers import WANDB_RESERVED

    valid = [p for p in inspect.signature(wandb.init).parameters if p not in WANDB_RESERVED]
    unknown = [k for k in logger.wandb if k not in valid]
    if unknown:
        raise ConfigError(
            f"logger.wandb.{unknown[0]} is not an argument of wandb.init"
            + (" (hydralm logs the composed config as the run config)" if unknown[0] in WANDB_RESERVED else "")
            + f"; valid arguments: {', '.join(valid)}"
        )


def _check_report(report: DictConfig) -> None:
    if report.dir is None:
        raise ConfigError("report.dir must be set: a run directory or a multirun sweep directory")
    from launcher.report import find_runs

    if not Path(report.dir).is_dir():
        raise ConfigError(f"report.dir={report.dir} does not exist")
    if not find_runs(Path(report.dir)):
        raise ConfigError(f"report.dir={report.dir} holds no metrics.jsonl (neither a run nor a sweep of runs)")
