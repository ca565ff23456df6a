"""Final outputs, gathered from the shards on rank 0: a consolidated HuggingFace model
(safetensors + config + tokenizer), or (peft=lora) a PEFT adapter directory and optionally the
adapters merged into a plain HuggingFace model.

Memory bound: the weights are gathered one tensor at a time and each is streamed into its place in
a safetensors file (files of at most `max_shard_bytes`), so every rank holds at most one gathered
tensor (and the all-gather's buffer) beyond its own shard of the model.
"""

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from launcher.distributed import World, on_rank0_then_all
from launcher.model.lora import is_lora_model, reload_lora_model, trainable_state_dict
from launcher.model.modeling import runs_remote_code, save_hf_metadata
from launcher.store.atomic import atomic_directory, begin, commit, out_of_space
from launcher.store.run_dir import CHECKPOINTS_DIR

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
    """Collective: every rank calls it; rank 0 writes `out_dir` atomically (launcher/store/atomic.py).
    A failed write removes the staging directory and is raised on every rank (a full disk: one line).
    config.json and the tokenizer are written after every weight: a staging directory a kill left
    behind (`.final-model.partial`, its shards preallocated, some still zeros) has no config.json,
    so `from_pretrained` refuses it instead of loading zeros."""
    staging = begin(out_dir) if world.is_main else None
    failure = _write_weight_shards(model, staging, world, max_shard_bytes, None)

    def publish() -> None:  # rank 0; its failure is raised on every rank
        try:
            if failure is not None:
                raise failure
            save_hf_metadata(model, tokenizer, staging)
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
                trusted = runs_remote_code(model)  # the user trusted the base's own code for this run
                with atomic_directory(target) as staging:
                    reload_lora_model(out_dir, trusted).merge_and_unload().save_pretrained(staging)
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


def _write_weight_shards(model: torch.nn.Module, directory: Path, world: World, max_shard_bytes: int,
                         failure: Optional[Exception]) -> Optional[Exception]:
    """Gather one tensor at a time (collective) and stream it into its place in a safetensors file
    (rank 0), under the names and layout transformers' `save_pretrained` writes.

    Returns rank 0's first write failure (or the one given). After a failure rank 0 still takes
    part in every gather but writes nothing more, so no rank waits for it."""
    state = get_model_state_dict(model)  # this rank's shards (DTensors): nothing gathered yet
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    names = [name for name in state if name not in tied]
    files, writers = [], {}
    if world.is_main and failure is None:
        try:
            files = _plan_files(model, state, names, max_shard_bytes)
            for file, layout in files:
                writers[file] = SafetensorsStream(directory / file, layout)
        except Exception as err:
            failure = err
    where = {saved: writers[file] for file, layout in files if file in writers for saved in layout}
    try:
        for name in names:
            tensor = state[name]
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()  # collective
            if world.is_main and failure is None:
                try:
                    _write_saved(model, name, full, where)
                except Exception as err:
                    failure = err
            del full  # before the next gather: one gathered tensor at a time
    finally:
        for writer in writers.values():
            writer.close()
    if world.is_main and failure is None and len(files) > 1:
        index = {"metadata": {"total_size": sum(w.data_bytes for w in writers.values())},
                 "weight_map": {saved: file for file, layout in files for saved in layout}}
        try:
            (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        except Exception as err:
            failure = err
    return failure


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
