"""Datasets for training: tokenize + pack (cached), and the loaders that feed the training loop.

Packing works on the flat Arrow token column with numpy (linear time, no per-token Python
objects); the cache key covers the corpus, the tokenizer and every preprocessing setting.
"""

import hashlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, load_from_disk
from datasets.table import InMemoryTable
from omegaconf import DictConfig
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from launcher.corpus import fingerprint, split_pydoc
from launcher.distributed import World, barrier
from launcher.errors import ConfigError

# torchdata's StatefulDataLoader still calls a deprecated torch API on every construction.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

PREPROCESS_VERSION = 1
COMPLETE_MARKER = "COMPLETE"


def cache_root(data_cfg: DictConfig) -> Path:
    default = os.environ.get("HYDRALM_CACHE", Path.home() / ".cache" / "hydralm")
    return Path(data_cfg.cache_dir or default)


def tokenizer_fingerprint(tokenizer) -> str:
    spec = tokenizer.backend_tokenizer.to_str() + json.dumps(tokenizer.special_tokens_map, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


def prepared_splits(cfg: DictConfig, tokenizer, world: World) -> dict[str, Dataset]:
    """{"train", "eval"} token datasets: read from disk, or preprocessed once (rank 0) and cached."""
    data = cfg.data
    if data.source == "preprocessed":
        return {"train": _load(data.train_ds, "data.train_ds"), "eval": _load(data.eval_ds, "data.eval_ds")}
    texts = split_pydoc(data.eval_every)
    settings = preprocess_settings(cfg, tokenizer, texts)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(data) / "pydoc" / key
    if world.is_main and not (path / COMPLETE_MARKER).exists():
        save_splits(build_splits(cfg, tokenizer, texts), path, settings)
    barrier()
    return {name: load_from_disk(str(path / name)) for name in ("train", "eval")}


def preprocess_settings(cfg: DictConfig, tokenizer, texts: dict[str, list[str]]) -> dict:
    """Everything the packed result depends on: the cache key, and a record next to the data."""
    return {
        "version": PREPROCESS_VERSION,
        "corpus": fingerprint(texts["train"] + ["<eval>"] + texts["eval"]),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": cfg.train.max_seq_len,
        "add_bos_eos_tokens": cfg.data.add_bos_eos_tokens,
    }


def build_splits(cfg: DictConfig, tokenizer, texts: dict[str, list[str]]) -> dict[str, Dataset]:
    return {name: tokenize_and_pack(docs, tokenizer, cfg.train.max_seq_len, cfg.data) for name, docs in texts.items()}


def save_splits(splits: dict[str, Dataset], path: Path, settings: dict) -> None:
    """Write next to the target and rename, so a crash never leaves a half-written dataset."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name, dataset in splits.items():
        dataset.save_to_disk(str(partial / name))
    (partial / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    (partial / COMPLETE_MARKER).touch()
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, path)


def _load(path: str, key: str) -> Dataset:
    dataset = load_from_disk(path)
    if not isinstance(dataset, Dataset) or "input_ids" not in dataset.column_names:
        raise ConfigError(f"{key}={path} is not a preprocessed dataset with an input_ids column")
    return dataset


def tokenize_and_pack(texts: list[str], tokenizer, max_seq_len: int, data: DictConfig) -> Dataset:
    raw = Dataset.from_dict({"text": texts})
    tokenized = raw.map(
        lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
        num_proc=data.num_proc,
        desc="tokenizing",
    )
    column = tokenized.data.column("input_ids").combine_chunks()
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id) if data.add_bos_eos_tokens else None
    if special is not None and None in special:
        raise ConfigError("data.add_bos_eos_tokens=true but the tokenizer has no BOS or EOS token")
    return pack_full(column.values.to_numpy(), column.offsets.to_numpy(), max_seq_len, special)


def pack_full(tokens: np.ndarray, doc_offsets: np.ndarray, max_seq_len: int, bos_eos=None) -> Dataset:
    """Concatenate all documents and cut the stream into chunks of `max_seq_len`.

    With `bos_eos`, every chunk is BOS + (max_seq_len - 2) tokens + EOS. `position_ids` restart
    at 0 at every document boundary inside a chunk (and after BOS at each chunk start).
    """
    content = max_seq_len - 2 if bos_eos else max_seq_len
    n = len(tokens)
    index = np.arange(n)
    chunk = index // content
    doc = np.searchsorted(doc_offsets, index, side="right") - 1
    segment_start = np.maximum(doc_offsets[doc], chunk * content)
    positions = index - segment_start
    n_chunks = math.ceil(n / content)
    lengths = np.full(n_chunks, content)
    lengths[-1] = n - content * (n_chunks - 1)
    if bos_eos:
        bos, eos = bos_eos
        starts_at_chunk = segment_start == chunk * content
        positions = positions + starts_at_chunk  # BOS takes position 0 of its chunk
        out_lengths = lengths + 2
        out_offsets = np.concatenate([[0], np.cumsum(out_lengths)])
        out_tokens = np.empty(out_offsets[-1], dtype=np.int32)
        out_positions = np.empty_like(out_tokens)
        slots = index + 2 * chunk + 1
        out_tokens[slots], out_positions[slots] = tokens, positions
        out_tokens[out_offsets[:-1]], out_positions[out_offsets[:-1]] = bos, 0
        last = out_offsets[1:] - 1
        out_tokens[last], out_positions[last] = eos, out_positions[last - 1] + 1
    else:
        out_offsets = np.concatenate([[0], np.cumsum(lengths)])
        out_tokens, out_positions = tokens.astype(np.int32), positions.astype(np.int32)
    offsets = pa.array(out_offsets, type=pa.int32())
    input_ids = pa.ListArray.from_arrays(offsets, pa.array(out_tokens, type=pa.int32()))
    table = pa.table(
        {
            "input_ids": input_ids,
            "labels": input_ids,
            "position_ids": pa.ListArray.from_arrays(offsets, pa.array(out_positions, type=pa.int32())),
        }
    )
    return Dataset(InMemoryTable(table))


class PadCollator:
    """Right-pads a list of rows into tensors; padded labels are ignored by the loss."""

    def __init__(self, pad_id: int, ignore_index: int):
        self.pad_id, self.ignore_index = pad_id, ignore_index

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), self.ignore_index, dtype=np.int64)
        position_ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n], labels[i, :n] = row["input_ids"], row["labels"]
            if "position_ids" in row:
                position_ids[i, :n] = row["position_ids"]
            else:
                position_ids[i, :n] = np.arange(n)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }


class EvenShard(torch.utils.data.Dataset):
    """This rank's strided share of an eval set, padded so every rank runs the same number of
    forward passes (FSDP collectives must match); padding rows carry only ignored labels."""

    def __init__(self, dataset: Dataset, world: World, ignore_index: int):
        self.dataset, self.world, self.ignore_index = dataset, world, ignore_index
        self.length = math.ceil(len(dataset) / world.size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        index = self.world.rank + i * self.world.size
        if index < len(self.dataset):
            return self.dataset[index]
        row = dict(self.dataset[0])
        row["labels"] = np.full(len(row["labels"]), self.ignore_index)
        return row


def train_loader(dataset: Dataset, cfg: DictConfig, world: World, pad_id: int) -> StatefulDataLoader:
    sampler = DistributedSampler(
        dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    return StatefulDataLoader(
        dataset.with_format("numpy"),
        batch_size=cfg.data.train_bs,
        sampler=sampler,
        drop_last=True,
        collate_fn=PadCollator(pad_id, cfg.data.ignore_index),
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",  # lets the step's host-to-device copies run async
    )


def eval_loader(dataset: Dataset, cfg: DictConfig, world: World, pad_id: int) -> StatefulDataLoader:
    return StatefulDataLoader(
        EvenShard(dataset.with_format("numpy"), world, cfg.data.ignore_index),
        batch_size=cfg.data.eval_bs,
        collate_fn=PadCollator(pad_id, cfg.data.ignore_index),
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",  # lets the step's host-to-device copies run async
    )

