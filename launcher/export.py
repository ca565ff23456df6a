"""Final outputs: a consolidated HuggingFace model, or (peft=lora) a PEFT adapter directory and
optionally the adapters merged into a plain HuggingFace model. Gathered from the shards on rank 0."""

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from launcher.distributed import World, barrier
from launcher.modeling import base_model_class

MERGED_SUFFIX = "-merged"


def save_hf_model(model: torch.nn.Module, tokenizer, out_dir: Path, world: World) -> None:
    """Collective: every rank calls it; rank 0 writes `out_dir` atomically (tmp dir + rename)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:

        def write(directory: Path) -> None:
            model.save_pretrained(directory, state_dict=state)
            tokenizer.save_pretrained(directory)
            _fix_architecture(model, directory)

        _write_atomically(out_dir, write)
    barrier()


def save_lora_adapter(model: torch.nn.Module, tokenizer, out_dir: Path, world: World, merge: bool) -> None:
    """Collective. `out_dir`: the adapters only (`PeftModel.from_pretrained(base, out_dir)`; the
    base is recorded in adapter_config.json). merge: also `<out_dir>-merged`, a plain HF model."""
    from launcher.lora import reload_lora_model, trainable_state_dict

    state = trainable_state_dict(model)
    if world.is_main:

        def write(directory: Path) -> None:
            model.save_pretrained(directory, state_dict=state)  # peft keeps the adapter keys
            tokenizer.save_pretrained(directory)

        _write_atomically(out_dir, write)
        if merge:  # the researcher's reload path, so the merged model is what the adapters give

            def write_merged(directory: Path) -> None:
                reload_lora_model(out_dir).merge_and_unload().save_pretrained(directory)
                tokenizer.save_pretrained(directory)

            _write_atomically(merged_dir(out_dir), write_merged)
    barrier()


def merged_dir(adapter_dir: Path) -> Path:
    return adapter_dir.with_name(adapter_dir.name + MERGED_SUFFIX)


def save_base_model(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """The unwrapped model as it is now (before adapters and sharding), for adapters to apply to."""
    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    _write_atomically(out_dir, write)


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary sibling directory, which then replaces `out_dir`."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    previous = out_dir.with_name(out_dir.name + ".previous")
    if out_dir.exists():
        os.replace(out_dir, previous)
    os.replace(partial, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


def _fix_architecture(model: torch.nn.Module, directory: Path) -> None:
    """save_pretrained records the FSDP wrapper class; record the HF class it wraps."""
    config = model.config.__class__.from_pretrained(directory)
    config.architectures = [base_model_class(model).__name__]
    config.save_pretrained(directory)
