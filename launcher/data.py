"""Datasets for training: load a raw corpus, tokenize, pack (cached), and the loaders.

Tokenizing is a batched, multi-process `datasets.map` that writes token ids straight to Arrow
(no attention masks, no offsets); packing streams the memory-mapped token column batch by batch
through `launcher.packing` (numpy), so a corpus bigger than RAM works. The cache key covers the
corpus, the tokenizer and every preprocessing setting.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Features, List, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from omegaconf import DictConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm

from launcher.corpus import raw_splits, source_fingerprint
from launcher.distributed import World, barrier
from launcher.errors import ConfigError
from launcher.packing import Documents, Packer, PackingSpec
from launcher.sampler import ResumableDistributedSampler

# torchdata's StatefulDataLoader still calls a deprecated torch API on every construction.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

log = logging.getLogger("hydralm")

PREPROCESS_VERSION = 2
COMPLETE_MARKER = "COMPLETE"
TOKENIZE_BATCH = 1000  # documents per tokenizer call
PACK_BATCH = 20_000  # documents per packing step (bounds memory, not speed)
ROW_FEATURES = Features({
    "input_ids": List(Value("int32")),
    "labels": List(Value("int32")),
    "position_ids": List(Value("int32")),
    "id": Value("int64"),
})
TOKEN_FEATURES = Features({
    "input_ids": List(Value("int32")),
    "prompt_length": Value("int32"),
    "source_index": Value("int64"),
})


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
    raw = raw_splits(data)
    settings = preprocess_settings(cfg, tokenizer, raw)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(data) / data.source / key
    if world.is_main and not is_up_to_date(path, settings):
        build_and_save(cfg, tokenizer, raw, path, settings)
    barrier()
    return {name: load_from_disk(str(path / name)) for name in ("train", "eval")}


def preprocess_settings(cfg: DictConfig, tokenizer, raw: dict[str, Dataset | None]) -> dict:
    """Everything the packed result depends on: the cache key, and a record next to the data."""
    data = cfg.data
    return {
        "version": PREPROCESS_VERSION,
        "source": data.source,
        "corpus": {name: source_fingerprint(data, dataset) for name, dataset in raw.items()},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": cfg.train.max_seq_len,
        **{key: data[key] for key in (
            "data_field", "pre_pend", "add_bos_eos_tokens", "separator", "truncate", "packing_type",
            "overlap", "ignore_index", "eval_every", "eval_split", "split")},
    }


def is_up_to_date(path: Path, settings: dict) -> bool:
    """A complete result of exactly these settings is already at `path`."""
    record = path / "settings.json"
    return (path / COMPLETE_MARKER).exists() and record.exists() and json.loads(record.read_text()) == settings


def packing_spec(cfg: DictConfig, tokenizer) -> PackingSpec:
    data = cfg.data
    bos_eos = None
    if data.add_bos_eos_tokens:
        bos_eos = (tokenizer.bos_token_id, tokenizer.eos_token_id)
        if None in bos_eos:
            raise ConfigError(
                f"data.add_bos_eos_tokens=true but the tokenizer has no BOS or EOS token "
                f"(bos_token_id={bos_eos[0]}, eos_token_id={bos_eos[1]}); set data.add_bos_eos_tokens=false"
            )
    mode = data.packing_type or ("truncate" if data.truncate else "none")
    return PackingSpec(mode, cfg.train.max_seq_len, data.overlap, bos_eos, data.ignore_index)


def build_and_save(cfg: DictConfig, tokenizer, raw: dict[str, Dataset | None], path: Path, settings: dict) -> dict:
    """Tokenize and pack into `path` ({train,eval}/, settings.json, report.json). Everything is
    written next to the target and renamed, so a failure never leaves a half-written dataset."""
    spec = packing_spec(cfg, tokenizer)
    data = cfg.data
    for dataset in raw.values():
        if dataset is not None and data.data_field not in dataset.column_names:
            raise ConfigError(f"data.data_field={data.data_field} is not a column of the dataset; "
                              f"columns: {', '.join(dataset.column_names)}")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        report = _build(raw, tokenizer, spec, data, partial)
        (partial / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        (partial / "report.json").write_text(json.dumps(report, indent=2))
        (partial / COMPLETE_MARKER).touch()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, path)
    _warn_about(report, cfg)
    return report


def _build(raw: dict[str, Dataset | None], tokenizer, spec: PackingSpec, data: DictConfig, out: Path) -> dict:
    """Tokenize (Arrow files), pack (Arrow files), save {train,eval} under `out`; stage timings."""
    work = out / "work"
    work.mkdir(parents=True)
    clock = time.perf_counter()
    tokenized = {name: tokenize(dataset, tokenizer, data, work / f"tokens-{name}.arrow")
                 for name, dataset in raw.items() if dataset is not None}
    seconds = {"tokenize": time.perf_counter() - clock}
    clock = time.perf_counter()
    packed, report = pack_to_files(tokenized, spec, data.eval_every, work)
    seconds["pack"] = time.perf_counter() - clock
    clock = time.perf_counter()
    for name, file in packed.items():
        dataset = Dataset.from_file(str(file))
        if len(dataset) == 0:
            raise ConfigError(f"the {name} split is empty after preprocessing ({report['examples']} examples read)")
        dataset.save_to_disk(str(out / name))  # (its num_proc spawns interpreters: slower than one copy)
    shutil.rmtree(work)
    seconds["save"] = time.perf_counter() - clock
    report["seconds"] = seconds
    return report


class Tokenize:
    """A batched `map` function: Arrow text column in, Arrow token lists out.

    Uses the fast tokenizer's `encode_batch_fast` (no offsets, no attention masks, no special
    tokens: BOS/EOS are placed by the packer). With a separator, the prompt (up to and including
    the separator) and the answer are tokenized apart, so the label mask falls exactly on the
    separator; an example without it gets prompt_length -1 and is skipped when packing.
    """

    def __init__(self, tokenizer, field: str, pre_pend: str | None, separator: str | None):
        self.tokenizer, self.field, self.pre_pend, self.separator = tokenizer, field, pre_pend, separator

    def encode(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer
            return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, batch: pa.Table, indices: list[int]) -> pa.Table:
        texts = [text or "" for text in batch.column(self.field).to_pylist()]
        if self.pre_pend:
            texts = [self.pre_pend + text for text in texts]
        if self.separator is None:
            ids = self.encode(texts)
            prompt_lengths = [0] * len(texts)
        else:
            parts = [text.partition(self.separator) for text in texts]
            prompts = self.encode([prompt + sep for prompt, sep, _ in parts])
            answers = self.encode([answer for _, _, answer in parts])
            found = [bool(sep) for _, sep, _ in parts]
            ids = [p + a if ok else [] for p, a, ok in zip(prompts, answers, found)]
            prompt_lengths = [len(p) if ok else -1 for p, ok in zip(prompts, found)]
        return pa.table({
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "prompt_length": pa.array(prompt_lengths, type=pa.int32()),
            "source_index": pa.array(indices, type=pa.int64()),
        })


def tokenize(dataset: Dataset, tokenizer, data: DictConfig, cache_file: Path) -> Dataset:
    num_proc = data.num_proc if data.num_proc and len(dataset) >= 2 * data.num_proc else None
    return dataset.with_format("arrow").map(
        Tokenize(tokenizer, data.data_field, data.pre_pend, data.separator),
        with_indices=True,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        remove_columns=dataset.column_names,
        features=TOKEN_FEATURES,
        num_proc=num_proc,
        cache_file_name=str(cache_file),
        new_fingerprint=hashlib.sha256(str(cache_file).encode()).hexdigest()[:16],
        desc="tokenizing",
    ).with_format(None)


def documents_of(batch: pa.RecordBatch) -> Documents:
    """Zero-copy numpy views of a batch of the tokenized column."""
    column = batch.column("input_ids")
    offsets = column.offsets.to_numpy().astype(np.int64)
    tokens = column.values.to_numpy()[offsets[0]:offsets[-1]]
    return Documents(tokens, offsets - offsets[0], batch.column("source_index").to_numpy(),
                     batch.column("prompt_length").to_numpy())


def pack_to_files(tokenized: dict[str, Dataset], spec: PackingSpec, eval_every: int, work: Path):
    """Stream the token batches through one packer per output split into Arrow files.

    Without an eval dataset, every `eval_every`-th example (by source index) goes to eval.
    Returns {split: file} and a report of what was read, skipped and written.
    """
    files = {name: work / f"{name}.arrow" for name in ("train", "eval")}
    writers = {name: ArrowWriter(features=ROW_FEATURES, path=str(file)) for name, file in files.items()}
    packers = {name: Packer(spec) for name in files}
    report = {"examples": 0, "tokens": 0, "skipped_without_separator": 0, "longer_than_max_seq_len": 0}
    frame = 2 if spec.bos_eos else 0
    total = sum(len(d) for d in tokenized.values())
    with tqdm(total=total, desc="packing", unit="docs", disable=None) as progress:
        for source, dataset in tokenized.items():
            for batch in dataset.data.table.to_batches(max_chunksize=PACK_BATCH):
                docs = documents_of(batch)
                report["examples"] += len(docs)
                report["tokens"] += len(docs.tokens)
                has_separator = docs.prompt_lengths >= 0
                report["skipped_without_separator"] += int((~has_separator).sum())
                too_long = np.diff(docs.offsets) + frame > spec.max_seq_len
                report["longer_than_max_seq_len"] += int((too_long & has_separator).sum())
                if source == "eval":
                    routes = {"eval": has_separator}
                else:
                    held_out = docs.ids % eval_every == 0 if "eval" not in tokenized else np.zeros(len(docs), bool)
                    routes = {"train": has_separator & ~held_out, "eval": has_separator & held_out}
                for name, keep in routes.items():
                    if keep.any():
                        writers[name].write_table(packers[name].add(docs.select(keep)))
                progress.update(len(docs))
    for name, writer in writers.items():
        writer.write_table(packers[name].finish())
        writer.finalize()
        report[f"{name}_rows"] = packers[name].rows_emitted
    return files, report


def _warn_about(report: dict, cfg: DictConfig) -> None:
    data = cfg.data
    if report["skipped_without_separator"]:
        log.warning(
            "data.separator=%r: skipped %d of %d examples that do not contain it",
            data.separator, report["skipped_without_separator"], report["examples"],
        )
    if report["longer_than_max_seq_len"] and not data.packing_type and not data.truncate:
        log.warning(
            "%d of %d examples are longer than train.max_seq_len=%d and are kept whole; "
            "set data.packing_type or data.truncate=true to cut them",
            report["longer_than_max_seq_len"], report["examples"], cfg.train.max_seq_len,
        )


def _load(path: str, key: str) -> Dataset:
    dataset = load_from_disk(path)
    if not isinstance(dataset, Dataset) or "input_ids" not in dataset.column_names:
        raise ConfigError(f"{key}={path} is not a preprocessed dataset with an input_ids column")
    return dataset


class PadCollator:
    """Right-pads a list of rows into tensors; padded labels are ignored by the loss.

    With `document_mask`, the batch carries the rows' per-document `position_ids` (the model then
    keeps packed documents apart, see `launcher.losses.model_inputs`) and the first token of every
    document is not a target: predicting it would need the previous document.
    """

    def __init__(self, pad_id: int, ignore_index: int, document_mask: bool = False):
        self.pad_id, self.ignore_index, self.document_mask = pad_id, ignore_index, document_mask

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), self.ignore_index, dtype=np.int64)
        position_ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n], labels[i, :n] = row["input_ids"], row["labels"]
            position_ids[i, :n] = row["position_ids"] if "position_ids" in row else np.arange(n)
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if self.document_mask:
            labels[position_ids == 0] = self.ignore_index
            batch["position_ids"] = torch.from_numpy(position_ids)
        return batch


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
    sampler = ResumableDistributedSampler(len(dataset), world.size, world.rank, cfg.train.seed)
    return StatefulDataLoader(
        dataset.with_format("numpy"),
        batch_size=cfg.data.train_bs,
        sampler=sampler,
        drop_last=True,
        collate_fn=PadCollator(pad_id, cfg.data.ignore_index, cfg.data.document_mask),
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",  # lets the step's host-to-device copies run async
        generator=_own_generator(cfg),
    )


def _own_generator(cfg: DictConfig) -> torch.Generator:
    """Each new iterator draws a worker seed; from its own generator, that draw leaves the global
    RNG alone, so dropout after a resume sees the same random stream as the uninterrupted run."""
    return torch.Generator().manual_seed(cfg.train.seed)


def eval_loader(dataset: Dataset, cfg: DictConfig, world: World, pad_id: int) -> StatefulDataLoader:
    return StatefulDataLoader(
        EvenShard(dataset.with_format("numpy"), world, cfg.data.ignore_index),
        batch_size=cfg.data.eval_bs,
        collate_fn=PadCollator(pad_id, cfg.data.ignore_index, cfg.data.document_mask),
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",  # lets the step's host-to-device copies run async
        generator=_own_generator(cfg),
    )

