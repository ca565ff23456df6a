"""Consolidated HuggingFace export: gather the shards, write safetensors + config + tokenizer."""

import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from launcher.distributed import World, barrier
from launcher.modeling import base_model_class


def save_hf_model(model: torch.nn.Module, tokenizer, out_dir: Path, world: World) -> None:
    """Collective: every rank calls it; rank 0 writes `out_dir` atomically (tmp dir + rename)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, state_dict=state)
        tokenizer.save_pretrained(partial)
        _fix_architecture(model, partial)
        previous = out_dir.with_name(out_dir.name + ".previous")
        if out_dir.exists():
            os.replace(out_dir, previous)
        os.replace(partial, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def _fix_architecture(model: torch.nn.Module, directory: Path) -> None:
    """save_pretrained records the FSDP wrapper class; record the HF class it wraps."""
    config = model.config.__class__.from_pretrained(directory)
    config.architectures = [base_model_class(model).__name__]
    config.save_pretrained(directory)
