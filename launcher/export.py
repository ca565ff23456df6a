"""Final outputs, gathered from the shards on rank 0: a consolidated HuggingFace model
(safetensors + config + tokenizer), or (peft=lora) a PEFT adapter directory and optionally the
adapters merged into a plain HuggingFace model.

Memory bound: the weights are gathered one tensor at a time and each is streamed into its place in
a safetensors file (files of at most `max_shard_bytes`), so every rank holds at most one gathered
tensor (and the all-gather's buffer) beyond its own shard of the model.
"""

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from launcher.distributed import World, barrier
from launcher.modeling import base_model_class, runs_remote_code

MERGED_SUFFIX = "-merged"
MAX_SHARD_BYTES = 2 * 1024**3
INDEX_FILE = "model.safetensors.index.json"


def save_hf_model(
    model: torch.nn.Module, tokenizer, out_dir: Path, world: World, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Collective: every rank calls it; rank 0 writes `out_dir` atomically (tmp dir + rename)."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_hf_metadata(model, tokenizer, partial)
    _write_weight_shards(model, partial, world, max_shard_bytes)
    if world.is_main:
        previous = out_dir.with_name(out_dir.name + ".previous")
        if out_dir.exists():
            os.replace(out_dir, previous)
        os.replace(partial, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
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
                trusted = runs_remote_code(model)  # the user trusted the base's own code for this run
                reload_lora_model(out_dir, trusted).merge_and_unload().save_pretrained(directory)
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


def save_hf_metadata(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """config.json (naming the HF class under the FSDP wrapper), generation config, tokenizer."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [base_model_class(model).__name__]
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _write_weight_shards(model: torch.nn.Module, directory: Path, world: World, max_shard_bytes: int) -> None:
    """Gather one tensor at a time (collective) and stream it into its place in a safetensors file
    (rank 0), under the names and layout transformers' `save_pretrained` writes."""
    state = get_model_state_dict(model)  # this rank's shards (DTensors): nothing gathered yet
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    names = [name for name in state if name not in tied]
    files = _plan_files(model, state, names, max_shard_bytes) if world.is_main else []
    writers = {file: SafetensorsStream(directory / file, layout) for file, layout in files}
    where = {saved: writers[file] for file, layout in files for saved in layout}
    try:
        for name in names:
            tensor = state[name]
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()  # collective
            if world.is_main:
                _write_saved(model, name, full, where)
            del full  # before the next gather: one gathered tensor at a time
    finally:
        for writer in writers.values():
            writer.close()
    if world.is_main and len(files) > 1:
        index = {"metadata": {"total_size": sum(w.data_bytes for w in writers.values())},
                 "weight_map": {saved: file for file, layout in files for saved in layout}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _write_saved(model: torch.nn.Module, name: str, tensor: torch.Tensor, where: dict) -> None:
    for saved, part in saved_tensors(model, name, tensor).items():
        where[saved].write(saved, part)


def saved_tensors(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """What `save_pretrained` writes for the parameter `name`: transformers reverts the conversions
    it applies on load (e.g. a mixture of experts' fused expert tensors back to one per expert, GPT-NeoX's
    lm_head back to embed_out), so other tools read the export as they read the checkpoint."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {name: tensor})


def _plan_files(model, state: dict, names: list[str], max_shard_bytes: int) -> list[tuple[str, dict]]:
    """[(file name, {saved name: (shape, dtype)})], files of at most max_shard_bytes (or one tensor)."""
    files: list[dict] = [{}]
    file_bytes = 0
    for name in names:
        tensor = state[name]
        for saved, part in saved_tensors(model, name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")).items():
            nbytes = part.numel() * part.element_size()
            if files[-1] and file_bytes + nbytes > max_shard_bytes:
                files.append({})
                file_bytes = 0
            files[-1][saved] = (tuple(part.shape), part.dtype)
            file_bytes += nbytes
    if len(files) == 1:
        return [("model.safetensors", files[0])]
    return [(f"model-{i + 1:05d}-of-{len(files):05d}.safetensors", layout) for i, layout in enumerate(files)]


class SafetensorsStream:
    """A safetensors file written one tensor at a time: the header (names, dtypes, shapes, offsets)
    first, then each tensor's bytes at its offset, so the writer never holds more than one tensor."""

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header, offset = {}, 0
        for name, (shape, dtype) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.data_start = 8 + len(encoded)
        self.data_bytes = offset
        self.offsets = {name: entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.file.seek(self.data_start + self.offsets[name])
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self.file.close()


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
