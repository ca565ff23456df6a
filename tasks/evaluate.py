"""The `evaluate` task: eval loss and perplexity of `checkpoint` (an exported model) or `model`."""

import json
import math

from omegaconf import DictConfig

from launcher.checkpoint import load_task_model
from launcher.data import eval_loader, prepared_splits
from launcher.distributed import distributed, seed_everything
from launcher.outputs import resolve_output_dir
from tasks.train import eval_loss


def evaluate(cfg: DictConfig) -> dict:
    with distributed(cfg.sharding.backend) as world:
        seed_everything(cfg.train.seed)
        output_dir = resolve_output_dir(cfg, world)
        model_cfg, tokenizer, model = load_task_model(cfg, world)
        splits = prepared_splits(cfg, tokenizer, world)
        loss = eval_loss(model, eval_loader(splits["eval"], cfg, world, tokenizer.pad_token_id), cfg, world)
        result = {
            "model": model_cfg.path or model_cfg.name,
            "eval_loss": loss,
            "perplexity": math.exp(loss),
            "eval_sequences": len(splits["eval"]),
        }
        if world.is_main:
            (output_dir / "eval.json").write_text(json.dumps(result, indent=2))
            print(f"hydralm: eval loss {loss:.4f} (perplexity {result['perplexity']:.2f}) -> {output_dir / 'eval.json'}")
        return result
