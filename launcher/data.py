"""Preprocessing: tokenize and pack a raw corpus into training rows, once, cached.

Tokenizing is a batched, multi-process `datasets.map` that writes token ids straight to Arrow
(no attention masks, no offsets); packing streams the memory-mapped token column batch by batch
through `launcher.packing` (numpy), so a corpus bigger than RAM works. The cache key is the
corpus fingerprint, the tokenizer and every setting the schema marks as affecting preprocessing
(launcher/identity.py).
"""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

from launcher.atomic import atomic_directory, is_complete
from launcher.distributed import World, on_rank0_then_all
from launcher.errors import ConfigError, at_least, choice_error
from launcher.identity import identity
from launcher.packing import Documents, Packer, PackingSpec
from launcher.schema import PREPROCESSING
from launcher.sources import SOURCES, DataSource, source_of

log = logging.getLogger("hydralm")

PACKING_TYPES = ("full", "partial")

PREPROCESS_VERSION = 3
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

# build(cfg, tokenizer, raw splits, staging dir) -> report: writes {train,eval}/ into the staging dir.
Builder = Callable[[DictConfig, object, dict, Path], dict]


def cache_root(data_cfg: DictConfig) -> Path:
    default = os.environ.get("HYDRALM_CACHE", Path.home() / ".cache" / "hydralm")
    return Path(data_cfg.cache_dir or default)


def tokenizer_fingerprint(tokenizer) -> str:
    spec = tokenizer.backend_tokenizer.to_str() + json.dumps(tokenizer.special_tokens_map, sort_keys=True)
    spec += str(getattr(tokenizer, "chat_template", None))
    return hashlib.sha256(spec.encode()).hexdigest()


def prepared_splits(cfg: DictConfig, tokenizer, world: World) -> dict[str, Dataset]:
    """{"train", "eval"} rows for language modelling: read as they are (data.source=preprocessed),
    or preprocessed once and cached."""
    source = source_of(cfg.data)
    if source.tokenized:
        return source.splits()
    return cached_splits(cfg, tokenizer, world, source, "rows", build_rows)


def cached_splits(cfg: DictConfig, tokenizer, world: World, source: DataSource, kind: str,
                  build: Builder) -> dict[str, Dataset]:
    """Rank 0 finds or builds the cache entry of `kind` (rows, pairs, ...); every rank then reads
    it. A ConfigError on rank 0 reaches every rank, so no rank waits for one that gave up."""

    def find_or_build() -> str:
        raw = source.splits()
        settings = preprocess_settings(cfg, tokenizer, source, raw, kind)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_root(cfg.data) / str(cfg.data.source) / key
        if not is_up_to_date(path, settings):
            build_and_save(cfg, tokenizer, raw, path, settings, build)
        return str(path)

    path = Path(on_rank0_then_all(find_or_build, world))
    return {name: load_from_disk(str(path / name)) for name in ("train", "eval")}


def preprocess_settings(cfg: DictConfig, tokenizer, source: DataSource, raw: dict, kind: str) -> dict:
    """Everything the preprocessed result depends on: the cache key, and a record next to the data."""
    return {
        "version": PREPROCESS_VERSION,
        "kind": kind,
        "corpus": source.fingerprint(raw),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{key.removeprefix("data."): value for key, value in identity(cfg, PREPROCESSING).items()},
    }


def is_up_to_date(path: Path, settings: dict) -> bool:
    """A complete result of exactly these settings is already at `path`."""
    record = path / "settings.json"
    return is_complete(path) and record.is_file() and json.loads(record.read_text()) == settings


def check_data(cfg: DictConfig) -> None:
    """Before any loading: batch sizes, the source's own keys, then preprocessing."""
    data = cfg.data
    at_least(data.train_bs, 1, "data.train_bs")
    at_least(data.eval_bs, 1, "data.eval_bs")
    at_least(data.eval_every, 2, "data.eval_every")
    at_least(data.num_proc, 1, "data.num_proc")
    source = SOURCES.get(data.source)
    source.check(data)
    if not source.tokenized:
        check_preprocessing(data, cfg.train.max_seq_len)


def check_preprocessing(data: DictConfig, max_seq_len: int) -> None:
    """The preprocessing keys and their combinations (VectorLM's `seperator` spelling accepted)."""
    with open_dict(data):
        if data.seperator is not None:  # VectorLM's spelling
            if data.separator is not None and data.separator != data.seperator:
                raise ConfigError(f"data.separator={data.separator!r} and its alias data.seperator={data.seperator!r} differ")
            data.separator = data.seperator
    if data.separator == "":
        raise ConfigError("data.separator must not be empty")
    if not data.data_field:
        raise ConfigError("data.data_field must name the text column")
    if data.dataset_format != "hf":
        raise choice_error("data.dataset_format", data.dataset_format, ("hf",))
    if data.packing_type is not None and data.packing_type not in PACKING_TYPES:
        raise choice_error("data.packing_type", data.packing_type, PACKING_TYPES)
    if data.truncate and data.packing_type is not None:
        raise ConfigError(
            f"data.truncate=true and data.packing_type={data.packing_type} exclude each other: "
            "truncate cuts each example to one row, packing chunks them"
        )
    at_least(data.overlap, 0, "data.overlap")
    if data.overlap and data.packing_type is None:
        raise ConfigError(f"data.overlap={data.overlap} needs data.packing_type (full or partial)")
    chunk = max_seq_len - 2 if data.add_bos_eos_tokens else max_seq_len
    if data.overlap >= chunk:
        raise ConfigError(
            f"data.overlap={data.overlap} must be smaller than the chunk size {chunk} "
            f"(train.max_seq_len{' - 2 for BOS/EOS' if data.add_bos_eos_tokens else ''})"
        )
    if data.document_mask and data.packing_type != "full":
        raise ConfigError("data.document_mask=true needs data.packing_type=full (only full packing puts several documents in a row)")


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


def build_and_save(cfg: DictConfig, tokenizer, raw: dict, path: Path, settings: dict,
                   build: Builder = None) -> dict:
    """Preprocess into `path` ({train,eval}/, settings.json, report.json), atomically: a failure
    never leaves a half-written dataset. The builder warns about what its report says."""
    build = build or build_rows
    with atomic_directory(path) as staging:
        clock = time.perf_counter()
        report = build(cfg, tokenizer, raw, staging)
        report.setdefault("seconds", {})["total"] = time.perf_counter() - clock
        (staging / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        (staging / "report.json").write_text(json.dumps(report, indent=2))
    return report


def build_rows(cfg: DictConfig, tokenizer, raw: dict, out: Path) -> dict:
    """Language-modelling rows: tokenize, pack, save {train,eval} under `out`."""
    spec = packing_spec(cfg, tokenizer)
    data = cfg.data
    for dataset in raw.values():
        if dataset is not None and data.data_field not in dataset.column_names:
            raise ConfigError(f"data.data_field={data.data_field} is not a column of the dataset; "
                              f"columns: {', '.join(dataset.column_names)}")
    report = _build(raw, tokenizer, spec, data, out)
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
        return encode_texts(self.tokenizer, texts)

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


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the fast tokenizer's batch path when it has one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


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
