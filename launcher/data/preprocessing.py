"""Preprocessing: tokenize and pack a raw corpus into training rows, once, cached.

Tokenizing is a batched, multi-process `datasets.map` of the format's encoder (launcher/data/formats.py)
that writes token ids and the mask of trained tokens straight to Arrow; packing streams the
memory-mapped token column batch by batch through `launcher.data.packing` (numpy), so a corpus bigger
than RAM works. The cache key is the corpus fingerprint, the tokenizer and every setting the schema
marks as affecting preprocessing (launcher/store/identity.py). One process builds a cache entry at a
time (a file lock); the others wait and reuse it. An entry records a checksum of every file and is
verified each time it is used; a damaged one is rebuilt.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock, Timeout
from omegaconf import DictConfig
from tqdm.auto import tqdm

from launcher.data import formats
from launcher.data.mixture import Part, describe_mixture, mix
from launcher.data.packing import Documents, Packer, PackingSpec
from launcher.data.sources import SOURCES, DataSource, check_foreign_keys, source_of
from launcher.distributed import World, on_rank0_then_all
from launcher.errors import ConfigError, at_least, choice_error
from launcher.schema import PREPROCESSING
from launcher.store.atomic import atomic_directory, check_own_file, is_complete
from launcher.store.identity import identity
from launcher.store.integrity import CHECKSUMS, damaged_files, file_checksums

log = logging.getLogger("hydralm")

PACKING_TYPES = ("full", "partial")

PREPROCESS_VERSION = 5  # 5: templates with {% generation %} blocks train exactly the blocks
TOKENIZE_BATCH = 1000  # documents per map batch (the tokenizer's memory is bounded in formats.encode)
PACK_BATCH = 20_000  # documents per packing step (bounds memory, not speed)
ROW_FEATURES = Features({
    "input_ids": List(Value("int32")),
    "labels": List(Value("int32")),
    "position_ids": List(Value("int32")),
    "id": Value("int64"),
})
TOKEN_FEATURES = Features({
    "input_ids": List(Value("int32")),
    "trained": List(Value("bool")),  # per token: is it a target of the loss
    "dropped": Value("string"),  # why the example is not used ("" when it is)
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
    preprocessed once and cached, or mixed from several such sources (data.source=mixture)."""
    source = source_of(cfg.data)
    if source.mixes:
        return mixed_splits(cfg, tokenizer, world, prepared_splits)
    if source.tokenized:
        splits = source.splits()
        on_rank0_then_all(lambda: check_tokenized(splits, tokenizer, cfg.data.ignore_index), world)
        return splits
    check_tokenizer(cfg, tokenizer)
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
        report, built = ensure_built(cfg, tokenizer, raw, path, settings, build)
        if not built:
            _announce(report, cfg)
        return str(path)

    path = Path(on_rank0_then_all(find_or_build, world))
    return {name: load_from_disk(str(path / name)) for name in ("train", "eval")}


def mixed_splits(cfg: DictConfig, tokenizer, world: World, prepare) -> dict[str, Dataset]:
    """data.source=mixture: the components' splits mixed by weight (`mix_components`); the
    proportions are printed and written to report.json under data.cache_dir/mixture/."""
    splits, report = mix_components(cfg, tokenizer, world, prepare)
    if world.is_main:
        key = hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_root(cfg.data) / "mixture" / key
        with one_builder(path):
            if not is_complete(path):
                with atomic_directory(path) as staging:
                    (staging / "report.json").write_text(json.dumps(report, indent=2))
        log.info("data mixture (%s):\n%s", path / "report.json", describe_mixture(report))
    return splits


def mix_components(cfg: DictConfig, tokenizer, world: World, prepare) -> tuple[dict[str, Dataset], dict]:
    """Each component's splits from `prepare(cfg with that component as data, tokenizer, world)`
    (prepared_splits for rows; cached on their own), mixed (launcher/data/mixture.py)."""
    parts = []
    for weight, data in source_of(cfg.data).components():
        component = cfg.copy()
        component.data = data
        parts.append(Part(weight, data, prepare(component, tokenizer, world)))
    return mix(parts, cfg.train.seed)


def preprocess_settings(cfg: DictConfig, tokenizer, source: DataSource, raw: dict, kind: str) -> dict:
    """Everything the preprocessed result depends on: the cache key, and a record next to the data."""
    settings = {
        "version": PREPROCESS_VERSION,
        "kind": kind,
        "corpus": source.fingerprint(raw),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{key.removeprefix("data."): value for key, value in identity(cfg, PREPROCESSING).items()},
    }
    if cfg.data.chat_template is not None:  # a file's content, not its path
        settings["chat_template"] = formats.load_chat_template(cfg.data.chat_template)
    return settings


def is_up_to_date(path: Path, settings: dict) -> bool:
    """A complete result of exactly these settings is already at `path`."""
    record = path / "settings.json"
    try:
        return is_complete(path) and json.loads(record.read_text()) == settings
    except (OSError, ValueError):  # missing or damaged
        return False


def ensure_built(cfg: DictConfig, tokenizer, raw: dict, path: Path, settings: dict,
                 build: Builder = None) -> tuple[dict, bool]:
    """(report, whether it was built now) of an intact result of `settings` at `path`, built
    when there is none or when a file differs from its checksum (with a warning). One process
    builds at a time; the others wait, then reuse the result."""
    with one_builder(path):
        if is_up_to_date(path, settings):
            damaged = damaged_files(path)
            if not damaged:
                return json.loads((path / "report.json").read_text()), False
            log.warning("cache entry %s is damaged (%s differs from the checksum recorded when it was built); "
                        "rebuilding it", path, damaged[0])
        return build_and_save(cfg, tokenizer, raw, path, settings, build), True


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextmanager
def one_builder(path: Path) -> Iterator[None]:
    """Held while `path` is checked and (re)built: one builder per result. A second process with
    the same settings waits here (saying so), then finds the result built and reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_own_file(lock_path(path))  # filelock opens (and truncates) through a symlink: refuse one first
    lock = FileLock(str(lock_path(path)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", path)
        lock.acquire()
    except NotImplementedError:  # a filesystem without flock: nothing to hold
        log.warning("%s: the filesystem has no file locks; concurrent runs may build this cache entry twice", path.parent)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def check_tokenized(splits: dict[str, Dataset], tokenizer, ignore_index: int) -> None:
    """Already-tokenized rows (one pass each): intact, when task=preprocess recorded checksums
    next to them, and made of this tokenizer's ids: an id beyond its vocabulary would index past
    the embedding, or silently mean another token."""
    vocab = len(tokenizer)
    for dataset in splits.values():
        path = dataset_path(dataset)
        if (path.parent / CHECKSUMS).is_file():
            damaged = damaged_files(path.parent, f"{path.name}/")
            if damaged:
                raise ConfigError(f"{path}: {damaged[0]} differs from the checksum task=preprocess recorded; "
                                  "the dataset is damaged (write it again with task=preprocess)")
        for column in ("input_ids", "labels"):
            ids = pc.list_flatten(dataset.data.column(column))
            if column == "labels":
                ids = pc.filter(ids, pc.not_equal(ids, ignore_index))
            if len(ids) == 0:
                continue
            low, high = (value.as_py() for value in pc.min_max(ids).values())
            if low < 0 or high >= vocab:
                raise ConfigError(f"{path}: {column} holds token id {high if high >= vocab else low}, outside the "
                                  f"tokenizer's vocabulary [0, {vocab}) (tokenized with another tokenizer?)")


def dataset_path(dataset: Dataset) -> Path:
    """The directory a dataset was loaded from (load_from_disk)."""
    return Path(dataset.cache_files[0]["filename"]).parent


def check_data(cfg: DictConfig) -> None:
    """Before any loading: batch sizes, the source's own keys, then preprocessing (for each
    component of a mixture)."""
    data = cfg.data
    at_least(data.train_bs, 1, "data.train_bs")
    at_least(data.eval_bs, 1, "data.eval_bs")
    at_least(data.num_workers, 0, "data.num_workers")
    source = SOURCES.get(data.source)
    check_foreign_keys(data)
    source.check(data)
    components = [component for _, component in source(data).components()] if source.mixes else [data]
    for component in components:
        check_source(component, cfg.train.max_seq_len)


def check_source(data: DictConfig, max_seq_len: int) -> None:
    """One (non-mixture) source's keys and its preprocessing keys."""
    at_least(data.eval_every, 2, "data.eval_every")
    at_least(data.num_proc, 1, "data.num_proc")
    source = SOURCES.get(data.source)
    if source.mixes:
        raise ConfigError("a data.mixture component cannot itself be a mixture")
    check_foreign_keys(data)
    source.check(data)
    if not source.tokenized:
        check_preprocessing(data, max_seq_len)


def normalise_data(data: DictConfig) -> None:
    """VectorLM's `seperator` spelling becomes `separator`; the keys whose default depends on the
    format are filled in. Before the checks, which only read."""
    if data.seperator is not None:
        if data.separator is not None and data.separator != data.seperator:
            raise ConfigError(f"data.separator={data.separator!r} and its alias data.seperator={data.seperator!r} differ")
        data.separator = data.seperator
    formats.resolve_defaults(data)


def check_preprocessing(data: DictConfig, max_seq_len: int) -> None:
    """The preprocessing keys and their combinations (on a config `normalise_data` has seen)."""
    if data.format not in formats.FORMATS:
        raise choice_error("data.format", data.format, formats.FORMATS)
    if data.separator == "":
        raise ConfigError("data.separator must not be empty")
    if data.separator is not None and data.format != "text":
        raise ConfigError(f"data.separator applies to data.format=text; data.format={data.format} marks "
                          "what is trained on by itself")
    if data.pre_pend and data.format in formats.CONVERSATIONAL + ("alpaca",):
        raise ConfigError(f"data.pre_pend does not apply to data.format={data.format} (put it in a system message "
                          "or the template)")
    if data.format in formats.CONVERSATIONAL and data.add_bos_eos_tokens:
        raise ConfigError(f"data.add_bos_eos_tokens=true does not apply to data.format={data.format}: the chat "
                          "template places BOS and the end-of-turn tokens (leave it unset or false)")
    if data.chat_template is not None:
        if data.format == "text":
            raise ConfigError("data.chat_template applies to data.format=chat or prompt_completion")
        formats.load_chat_template(data.chat_template)
    for key in ("data_field", "prompt_field", "completion_field"):
        if not data[key]:
            raise ConfigError(f"data.{key} must name a column")
    if data.format == "prompt_completion" and data.prompt_field == data.completion_field:
        raise ConfigError(f"data.prompt_field and data.completion_field are both {data.prompt_field!r}")
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
    framed = formats.framing_place(data) == "row"
    chunk = max_seq_len - 2 if framed else max_seq_len
    if data.overlap >= chunk:
        raise ConfigError(
            f"data.overlap={data.overlap} must be smaller than the chunk size {chunk} "
            f"(train.max_seq_len{' - 2 for BOS/EOS' if framed else ''})"
        )
    if data.document_mask and data.packing_type != "full":
        raise ConfigError("data.document_mask=true needs data.packing_type=full (only full packing puts several documents in a row)")


def check_tokenizer(cfg: DictConfig, tokenizer) -> None:
    """What needs the tokenizer, before any data is read: BOS/EOS, the chat template."""
    packing_spec(cfg, tokenizer)
    formats.encoder(tokenizer, cfg.data)


def packing_spec(cfg: DictConfig, tokenizer) -> PackingSpec:
    data = cfg.data
    rows = formats.framing(tokenizer, data) if formats.framing_place(data) == "row" else None
    mode = data.packing_type or ("truncate" if data.truncate else "none")
    return PackingSpec(mode, cfg.train.max_seq_len, data.overlap, rows.ids if rows else None, data.ignore_index)


def build_and_save(cfg: DictConfig, tokenizer, raw: dict, path: Path, settings: dict,
                   build: Builder = None) -> dict:
    """Preprocess into `path` ({train,eval}/, settings.json, report.json, checksums.json),
    atomically: a failure never leaves a half-written dataset. Callers hold `one_builder(path)`."""
    build = build or build_rows
    with atomic_directory(path) as staging:
        clock = time.perf_counter()
        report = build(cfg, tokenizer, raw, staging)
        report.setdefault("seconds", {})["total"] = time.perf_counter() - clock
        (staging / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        (staging / CHECKSUMS).write_text(json.dumps(file_checksums(staging), indent=1))
    _announce(report, cfg, built=True)
    return report


def build_rows(cfg: DictConfig, tokenizer, raw: dict, out: Path) -> dict:
    """Language-modelling rows: check the columns, tokenize, pack, save {train,eval} under `out`."""
    spec = packing_spec(cfg, tokenizer)
    data = cfg.data
    source = source_of(data)
    for name, dataset in raw.items():
        if dataset is not None and formats.column_problem(dataset, data):
            where, problem = source.culprit(name, dataset, lambda d: formats.column_problem(d, data))
            raise ConfigError(f"{where}: {problem}")
    inputs = {name: source.describe(name if raw.get(name) is not None else "train") for name in ("train", "eval")}
    return _build(raw, tokenizer, spec, data, out, inputs)


def _build(raw: dict[str, Dataset | None], tokenizer, spec: PackingSpec, data: DictConfig, out: Path,
           inputs: dict[str, str]) -> dict:
    """Tokenize (Arrow files), pack (Arrow files), save {train,eval} under `out`; stage timings.
    `inputs` names what each split comes from, for the error when one ends up empty."""
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
            dropped = f", {sum(report['dropped'].values())} dropped" if report["dropped"] else ""
            raise ConfigError(f"{inputs[name]}: the {name} split is empty after preprocessing ({report['examples']} examples read"
                              f"{dropped}{_dropped_text(report, ': ')})")
        dataset.save_to_disk(str(out / name))  # (its num_proc spawns interpreters: slower than one copy)
    shutil.rmtree(work)
    seconds["save"] = time.perf_counter() - clock
    report["seconds"] = seconds
    return report


class Tokenize:
    """A batched `map` function: the raw columns the format reads in (Python values), token ids,
    the trained mask and the drop reason of every example out (an Arrow table)."""

    def __init__(self, tokenizer, data: DictConfig):
        self.encoder = formats.encoder(tokenizer, data)

    def __call__(self, batch: dict, indices: list[int]) -> pa.Table:
        encoded = self.encoder({column: batch[column] for column in self.encoder.columns if column in batch}, indices)
        lengths = np.array([len(ids) for ids in encoded.ids], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int32())
        ids = np.concatenate(encoded.ids) if len(lengths) else np.zeros(0, np.int32)
        trained = [np.ones(len(i), bool) if t is None else t for i, t in zip(encoded.ids, encoded.trained)]
        trained = np.concatenate(trained) if trained else np.zeros(0, bool)
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, type=pa.int32())),
            "trained": pa.ListArray.from_arrays(offsets, pa.array(trained, type=pa.bool_())),
            "dropped": pa.array(encoded.dropped, type=pa.string()),
            "source_index": pa.array(indices, type=pa.int64()),
        })


def tokenize(dataset: Dataset, tokenizer, data: DictConfig, cache_file: Path) -> Dataset:
    num_proc = data.num_proc if data.num_proc and len(dataset) >= 2 * data.num_proc else None
    tokenize_batch = Tokenize(tokenizer, data)
    columns = [column for column in tokenize_batch.encoder.columns if column in dataset.column_names]  # (optional ones)
    return dataset.select_columns(columns).map(
        tokenize_batch,
        with_indices=True,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        remove_columns=columns,
        features=TOKEN_FEATURES,
        num_proc=num_proc,
        cache_file_name=str(cache_file),
        new_fingerprint=hashlib.sha256(str(cache_file).encode()).hexdigest()[:16],
        desc="tokenizing",
    )


def documents_of(batch: pa.RecordBatch) -> Documents:
    """Numpy views of a batch of the tokenized column (the trained mask is unpacked from bits)."""
    column = batch.column("input_ids")
    offsets = column.offsets.to_numpy().astype(np.int64)
    tokens = column.values.to_numpy()[offsets[0]:offsets[-1]]
    trained_column = batch.column("trained")
    first = trained_column.offsets[0].as_py()
    trained = trained_column.values.slice(first, offsets[-1] - offsets[0]).to_numpy(zero_copy_only=False)
    return Documents(tokens, offsets - offsets[0], batch.column("source_index").to_numpy(), trained=trained)


def pack_to_files(tokenized: dict[str, Dataset], spec: PackingSpec, eval_every: int, work: Path):
    """Stream the token batches through one packer per output split into Arrow files.

    Without an eval dataset, every `eval_every`-th example (by source index) goes to eval.
    Returns {split: file} and a report of what was read, dropped (by reason) and written.
    """
    files = {name: work / f"{name}.arrow" for name in ("train", "eval")}
    writers = {name: ArrowWriter(features=ROW_FEATURES, path=str(file)) for name, file in files.items()}
    packers = {name: Packer(spec) for name in files}
    report = {"examples": 0, "tokens": 0, "dropped": {}, "first_dropped": {}, "longer_than_max_seq_len": 0}
    frame = 2 if spec.bos_eos else 0
    total = sum(len(d) for d in tokenized.values())
    with tqdm(total=total, desc="packing", unit="docs", disable=None) as progress:
        for source, dataset in tokenized.items():
            for batch in dataset.data.table.to_batches(max_chunksize=PACK_BATCH):
                docs = documents_of(batch)
                report["examples"] += len(docs)
                report["tokens"] += len(docs.tokens)
                kept = _count_dropped(batch, source, report)
                too_long = np.diff(docs.offsets) + frame > spec.max_seq_len
                report["longer_than_max_seq_len"] += int((too_long & kept).sum())
                if source == "eval":
                    routes = {"eval": kept}
                else:
                    held_out = docs.ids % eval_every == 0 if "eval" not in tokenized else np.zeros(len(docs), bool)
                    routes = {"train": kept & ~held_out, "eval": kept & held_out}
                for name, keep in routes.items():
                    if keep.any():
                        writers[name].write_table(packers[name].add(docs.select(keep)))
                progress.update(len(docs))
    for name, writer in writers.items():
        writer.write_table(packers[name].finish())
        writer.finalize()
        report[f"{name}_rows"] = packers[name].rows_emitted
    return files, report


def _count_dropped(batch: pa.RecordBatch, source: str, report: dict) -> np.ndarray:
    """Counts the batch's dropped examples by reason (and the first row of each); the kept mask."""
    dropped = batch.column("dropped")
    kept = pc.equal(dropped, "").to_numpy(zero_copy_only=False)
    if not kept.all():
        rows = batch.column("source_index").to_numpy()
        for reason in pc.unique(pc.filter(dropped, pc.invert(pc.equal(dropped, "")))).to_pylist():
            where = np.flatnonzero(dropped.to_numpy(zero_copy_only=False) == reason)
            report["dropped"][reason] = report["dropped"].get(reason, 0) + len(where)
            report["first_dropped"].setdefault(reason, f"{source} row {rows[where[0]]}")
    return kept


def _dropped_text(report: dict, lead: str = "") -> str:
    if not report.get("dropped"):
        return ""
    reasons = sorted(report["dropped"].items(), key=lambda item: -item[1])
    return lead + ", ".join(f"{count} {reason} (first: {report['first_dropped'][reason]})" for reason, count in reasons)


def _announce(report: dict, cfg: DictConfig, built: bool = False) -> None:
    """Dropped examples (by reason), every time the data is used; overlong ones when built."""
    data = cfg.data
    if report.get("dropped"):
        log.warning("data: dropped %d of %d examples: %s", sum(report["dropped"].values()), report["examples"],
                    _dropped_text(report))
    if built and report.get("longer_than_max_seq_len") and not data.packing_type and not data.truncate:
        log.warning(
            "%d of %d examples are longer than train.max_seq_len=%d and are kept whole; "
            "set data.packing_type or data.truncate=true to cut them",
            report["longer_than_max_seq_len"], report["examples"], cfg.train.max_seq_len,
        )
