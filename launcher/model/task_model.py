"""The model task=evaluate and task=export load: `checkpoint` (an exported HF directory or a
training checkpoint), else `model`. A peft=lora training checkpoint holds the adapters only: its
base is rebuilt (the run's base-model/, else its model.path) and its adapters are loaded onto it."""

import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from launcher.errors import ConfigError
from launcher.store.run_dir import BASE_MODEL, checkpoint_fingerprint, hf_dir, is_training_checkpoint


def model_config(cfg: DictConfig) -> DictConfig:
    """`model` with `checkpoint` in its place. An exported HF directory is loaded as it is; a
    training checkpoint gives the architecture (its `hf/` config, random init: the task then loads
    the weights) and the tokenizer."""
    if cfg.checkpoint is None:
        return cfg.model
    model = cfg.model.copy()  # our own copy: writable even while the checks hold cfg read-only
    with read_write(model), open_dict(model):
        if lora_settings(Path(cfg.checkpoint)) is not None:
            model.path, model.tokenizer = lora_base(Path(cfg.checkpoint)), str(hf_dir(Path(cfg.checkpoint)))
            model.config = None
            model.pad_vocab_to_multiple_of = 1  # a base whose embeddings the run grew was saved grown
        elif is_training_checkpoint(Path(cfg.checkpoint)):
            directory = hf_dir(Path(cfg.checkpoint))
            hf_config = json.loads((directory / "config.json").read_text())
            for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
                hf_config.pop(key, None)
            model.path, model.tokenizer, model.config = None, str(directory), hf_config
            model.pad_vocab_to_multiple_of = 1  # hf/config.json holds the trained vocabulary size
        else:
            model.path = model.tokenizer = cfg.checkpoint
            model.config = None
    return model


def load_task_model(cfg: DictConfig, world):
    """(model config, tokenizer, sharded model) of `checkpoint`, or of `model` (collective)."""
    from launcher.model.device_defaults import apply_device_defaults
    from launcher.model.lora import apply_lora
    from launcher.model.modeling import build_model, load_tokenizer
    from launcher.model.precision import cast_parameters, weight_dtype
    from launcher.model.sharding import prepare_model
    from launcher.training.checkpoint import load_model_weights

    model_cfg = model_config(cfg)
    tokenizer = load_tokenizer(model_cfg)
    from_checkpoint = cfg.checkpoint is not None and is_training_checkpoint(Path(cfg.checkpoint))
    lora = lora_settings(Path(cfg.checkpoint)) if from_checkpoint else None
    # From a training checkpoint no rank initialises weights: each allocates its shards and reads
    # them. A LoRA checkpoint's base is loaded from model_cfg.path; only its adapters are read.
    weights_follow = from_checkpoint and lora is None
    apply_device_defaults(cfg)  # a no-op after run_task's
    dtype = weight_dtype(cfg.train.precision)
    model = build_model(model_cfg, tokenizer, world, cfg.sharding.low_cpu_mem_usage, empty=weights_follow, dtype=dtype)
    if lora is not None:
        model = cast_parameters(apply_lora(model, OmegaConf.create(lora), model_cfg.path), dtype)
    model = prepare_model(model, cfg, world, weights_follow=weights_follow)
    if from_checkpoint:
        load_model_weights(model, Path(cfg.checkpoint))
    return model_cfg, tokenizer, model


def lora_settings(checkpoint: Path) -> Optional[dict]:
    """The `peft` keys a peft=lora training checkpoint was trained with (from its fingerprint), or
    None for any other path."""
    if not is_training_checkpoint(checkpoint):
        return None
    fingerprint = checkpoint_fingerprint(checkpoint) or {}
    if fingerprint.get("peft.name") != "lora":
        return None
    return {key.removeprefix("peft."): value for key, value in fingerprint.items() if key.startswith("peft.")}


def lora_base(checkpoint: Path) -> str:
    """The base a peft=lora training checkpoint's adapters apply to: its run's base-model/ (saved
    when model.path could not rebuild it: a random init, grown embeddings), else the run's model.path."""
    saved = checkpoint.resolve().parent.parent / BASE_MODEL  # <run>/checkpoints/checkpoint-N
    if saved.is_dir():
        return str(saved)
    path = checkpoint_fingerprint(checkpoint).get("model.path")
    if path is None:
        raise ConfigError(f"checkpoint={checkpoint} holds LoRA adapters on a random init that its run saved as "
                          f"{saved}, which is not there: name the checkpoint inside its run directory")
    return path
