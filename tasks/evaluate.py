"""The `evaluate` task: eval loss and perplexity of `checkpoint` (an exported model or a
training checkpoint) or `model`, on the eval split of `data`."""

import math
from pathlib import Path

from omegaconf import DictConfig

from launcher.cli.console import announce
from launcher.data.loaders import eval_loader
from launcher.distributed import distributed, seed_everything
from launcher.model.task_model import load_task_model
from launcher.errors import ConfigError
from launcher.store.atomic import WRITTEN_BY, read_own_json, write_json
from launcher.store.outputs import resolve_output_dir
from launcher.training.trainer import evaluate as evaluate_loss
from tasks.train import LanguageModeling


EVAL_RECORD = "eval.json"


def check_eval_record(cfg: DictConfig) -> None:
    """Before any work: an `eval.json` already in output_dir is replaced only when hydralm wrote
    it (a symlink, a directory or a FIFO there is one line too, `read_own_json`)."""
    if not cfg.output_dir:
        return  # Hydra's outputs/<date>/<time>/: a new directory
    path = Path(cfg.output_dir) / EVAL_RECORD
    record = read_own_json(path)
    if path.exists() and not (isinstance(record, dict) and record.get("written_by") == WRITTEN_BY["written_by"]):
        raise ConfigError(f"output_dir={cfg.output_dir} holds an {EVAL_RECORD} hydralm did not write: hydralm replaces "
                          f"only what it wrote; name another output_dir (or move that file away)")


def evaluate(cfg: DictConfig) -> dict:
    with distributed(cfg.sharding.backend, cfg.sharding.collective_timeout_s) as world:
        seed_everything(cfg.train.seed)
        output_dir = resolve_output_dir(cfg, world)
        model_cfg, tokenizer, model = load_task_model(cfg, world)
        task = LanguageModeling(cfg)
        split = task.datasets(tokenizer, world)["eval"]
        loader = eval_loader(split, cfg, world, task.collator(tokenizer))
        loss = evaluate_loss(model, loader, task, world, cfg.train.max_eval_batches)["eval_loss"]
        result = {
            "model": model_cfg.path or model_cfg.name,
            "eval_loss": loss,
            "perplexity": math.exp(loss),
            "eval_sequences": len(split),
        }
        if world.is_main:
            write_json(output_dir / EVAL_RECORD, {**WRITTEN_BY, **result})
            announce(f"hydralm: eval loss {loss:.4f} (perplexity {result['perplexity']:.2f}) -> {output_dir / EVAL_RECORD}")
        return result
