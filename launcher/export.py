"""Final outputs, gathered from the shards on rank 0: a consolidated HuggingFace model
(safetensors + config + tokenizer), or (peft=lora) a PEFT adapter directory and optionally the
adapters merged into a plain HuggingFace model.

Memory bound on rank 0: the weights are gathered one tensor at a time and written out one
safetensors shard at a time, so rank 0 holds at most max(`max_shard_bytes`, largest tensor) of
gathered weights beyond its own shard of the model (the other ranks: one tensor).
"""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from launcher.atomic import atomic_directory, begin, commit, out_of_space
from launcher.distributed import World, on_rank0_then_all
from launcher.lora import is_lora_model, reload_lora_model, trainable_state_dict
from launcher.modeling import base_model_class
from launcher.run_dir import CHECKPOINTS_DIR

MERGED_SUFFIX = "-merged"
MAX_SHARD_BYTES = 2 * 1024**3
INDEX_FILE = "model.safetensors.index.json"


def save_final_model(model: torch.nn.Module, tokenizer, out_dir: Path, world: World, merge_lora: bool) -> None:
    """Collective: the model a training run ends with, as HF weights or (peft=lora) adapters."""
    if is_lora_model(model):
        save_lora_adapter(model, tokenizer, out_dir, world, merge=merge_lora)
    else:
        save_hf_model(model, tokenizer, out_dir, world)


def save_hf_model(
    model: torch.nn.Module, tokenizer, out_dir: Path, world: World, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Collective: every rank calls it; rank 0 writes `out_dir` atomically (launcher/atomic.py).
    A failed write removes the staging directory and is raised on every rank (a full disk: one line)."""
    staging = begin(out_dir) if world.is_main else None
    failure = None
    if world.is_main:
        try:
            save_hf_metadata(model, tokenizer, staging)
        except Exception as err:
            failure = err
    failure = _write_weight_shards(model, staging, world, max_shard_bytes, failure)

    def publish() -> None:  # rank 0; its failure is raised on every rank
        try:
            if failure is not None:
                raise failure
            commit(staging, out_dir)
        except Exception as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise out_of_space(err, out_dir, kept=_kept(out_dir)) or err

    on_rank0_then_all(publish, world)


def _kept(out_dir: Path) -> str:
    previous = f"the previous {out_dir.name}" if out_dir.exists() else f"no {out_dir.name}"
    checkpoints = out_dir.parent / CHECKPOINTS_DIR
    return previous + (f", the checkpoints in {checkpoints}" if checkpoints.is_dir() else "")


def save_lora_adapter(model: torch.nn.Module, tokenizer, out_dir: Path, world: World, merge: bool) -> None:
    """Collective. `out_dir`: the adapters only (`PeftModel.from_pretrained(base, out_dir)`; the
    base is recorded in adapter_config.json). merge: also `<out_dir>-merged`, a plain HF model."""
    state = trainable_state_dict(model)

    def write() -> None:  # rank 0; its failure is raised on every rank
        target = out_dir
        try:
            with atomic_directory(out_dir) as staging:
                model.save_pretrained(staging, state_dict=state)  # peft keeps the adapter keys
                tokenizer.save_pretrained(staging)
            if merge:  # the researcher's reload path, so the merged model is what the adapters give
                target = merged_dir(out_dir)
                with atomic_directory(target) as staging:
                    reload_lora_model(out_dir).merge_and_unload().save_pretrained(staging)
                    tokenizer.save_pretrained(staging)
        except Exception as err:
            raise out_of_space(err, target, kept=_kept(target)) or err

    on_rank0_then_all(write, world)


def merged_dir(adapter_dir: Path) -> Path:
    return adapter_dir.with_name(adapter_dir.name + MERGED_SUFFIX)


def save_base_model(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """The unwrapped model as it is now (before adapters and sharding), for adapters to apply to."""
    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def save_hf_metadata(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """config.json (naming the HF class under the FSDP wrapper), generation config, tokenizer."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [base_model_class(model).__name__]
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _write_weight_shards(model: torch.nn.Module, directory: Path, world: World, max_shard_bytes: int,
                         failure: Optional[Exception]) -> Optional[Exception]:
    """Returns rank 0's first write failure (or the one given). After a failure rank 0 still takes
    part in every gather but writes nothing more, so no rank waits for it."""
    state = get_model_state_dict(model)  # this rank's shards (DTensors): nothing gathered yet
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[str, list[str]]] = []
    shard_bytes = total_bytes = 0
    for name, tensor in state.items():
        if name in tied:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()  # collective
        if not world.is_main or failure is not None:
            continue
        nbytes = full.numel() * full.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            try:
                written.append(_flush(shards.pop(), directory, len(written)))
            except Exception as err:
                failure = err
                continue
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = full.cpu().contiguous()
        shard_bytes += nbytes
        total_bytes += nbytes
    if world.is_main and failure is None:
        try:
            written.append(_flush(shards.pop(), directory, len(written)))
            _name_shards(written, directory, total_bytes)
        except Exception as err:
            failure = err
    return failure


def _flush(shard: dict[str, torch.Tensor], directory: Path, index: int) -> tuple[str, list[str]]:
    filename = f"model-{index + 1:05d}.safetensors"
    save_file(shard, directory / filename, metadata={"format": "pt"})
    return filename, list(shard)


def _name_shards(written: list[tuple[str, list[str]]], directory: Path, total_bytes: int) -> None:
    """HF's names: model.safetensors alone, or model-0000i-of-0000n.safetensors plus an index."""
    if len(written) == 1:
        os.replace(directory / written[0][0], directory / "model.safetensors")
        return
    weight_map = {}
    for i, (filename, keys) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(directory / filename, directory / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
