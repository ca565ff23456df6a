"""The model task=evaluate and task=export load: `checkpoint` (an exported HF directory or a
training checkpoint), else `model`."""

import json
from pathlib import Path

from omegaconf import DictConfig, open_dict, read_write

from launcher.store.run_dir import hf_dir, is_training_checkpoint


def model_config(cfg: DictConfig) -> DictConfig:
    """`model` with `checkpoint` in its place. An exported HF directory is loaded as it is; a
    training checkpoint gives the architecture (its `hf/` config, random init: the task then loads
    the weights) and the tokenizer."""
    if cfg.checkpoint is None:
        return cfg.model
    model = cfg.model.copy()  # our own copy: writable even while the checks hold cfg read-only
    with read_write(model), open_dict(model):
        if is_training_checkpoint(Path(cfg.checkpoint)):
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
    from launcher.model.modeling import build_model, load_tokenizer
    from launcher.model.device_defaults import apply_device_defaults
    from launcher.model.precision import weight_dtype
    from launcher.model.sharding import prepare_model
    from launcher.training.checkpoint import load_model_weights

    model_cfg = model_config(cfg)
    tokenizer = load_tokenizer(model_cfg)
    from_checkpoint = cfg.checkpoint is not None and is_training_checkpoint(Path(cfg.checkpoint))
    # From a training checkpoint no rank initialises weights: each allocates its shards and reads them.
    apply_device_defaults(cfg)  # a no-op after run_task's
    model = build_model(model_cfg, tokenizer, world, cfg.sharding.low_cpu_mem_usage, empty=from_checkpoint,
                        dtype=weight_dtype(cfg.train.precision))
    model = prepare_model(model, cfg, world, weights_follow=from_checkpoint)
    if from_checkpoint:
        load_model_weights(model, Path(cfg.checkpoint))
    return model_cfg, tokenizer, model
