"""The `export` task: write `checkpoint` (or `model`) as one consolidated HuggingFace directory.

`checkpoint` is an exported HF directory or a training checkpoint (`<output_dir>/checkpoints/
checkpoint-<step>`, any world size): its sharded weights are loaded into the sharded model. A
peft=lora run's checkpoint gives a PEFT adapter directory, as its final-model/ would be
(`export.merge_lora=true` adds `<final-model>-merged`, a plain HF model).

The model is loaded exactly as training would load it (pad token fallback, embeddings padded to
a multiple of `model.pad_vocab_to_multiple_of`) and gathered on rank 0.
"""

from omegaconf import DictConfig

from launcher.distributed import distributed
from launcher.job_log import announce
from launcher.model.task_model import load_task_model
from launcher.store.outputs import resolve_output_dir
from launcher.store.run_dir import FINAL_MODEL
from launcher.training.export import save_final_model


def export(cfg: DictConfig) -> dict:
    with distributed(cfg.sharding.backend, cfg.sharding.collective_timeout_s) as world:
        output_dir = resolve_output_dir(cfg, world)
        model_cfg, tokenizer, model = load_task_model(cfg, world)
        target = output_dir / FINAL_MODEL
        save_final_model(model, tokenizer, target, world, cfg.export.merge_lora)
        if world.is_main:
            announce(f"hydralm: exported {cfg.checkpoint or model_cfg.path or model_cfg.name} -> {target}")
        return {"final_model": str(target)}
