"""Training checkpoints: atomic, sharded, exactly resumable, refused when the run differs.

Layout of `<output_dir>/checkpoints/checkpoint-<step>/` (launcher/store/run_dir.py):

    .metadata, *.distcp   model + optimizer, sharded (torch.distributed.checkpoint); any world size loads it
    trainer_state.json    step/epoch counters, data position, scheduler state, run identity, task state
    rank-<r>.json         RNG states (python, numpy, torch, cuda) and unlogged metric sums of rank r
    hf/                   HF config, generation config and tokenizer (what `task=export` needs)
    COMPLETE              written last (launcher/store/atomic.py)

Every rank writes into the staging directory; rank 0 marks it complete and swaps it in, so a
kill at any moment leaves the previous checkpoint the latest. The COMPLETE marker records every
file's size and checksum (launcher/store/integrity.py; the shards are hashed while they are written);
they are checked before a checkpoint is loaded, and a damaged latest checkpoint gives way to the
newest intact one (`resume=auto`).

Nothing in a checkpoint runs code: DCP's `.metadata` pickle is read by an unpickler that builds
only DCP's own metadata classes, and non-tensor values (optimizer hyperparameters) only as plain
data (`torch.load(weights_only=True)`); everything else is JSON.
"""

import json
import logging
import math
import pickle
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from launcher.distributed import World, barrier, on_rank0_then_all
from launcher.errors import ConfigError, RunStopped
from launcher.model.modeling import save_hf_metadata
from launcher.store import atomic, integrity, run_dir
from launcher.store.identity import layout_keys, length_keys
from launcher.training.metrics import Window
from launcher.training.rng import rng_state, set_rng_state

FORMAT_VERSION = 3  # 3: checksums in the COMPLETE marker

log = logging.getLogger("hydralm")


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    epoch_samples: int = 0  # global samples of the current epoch consumed: the data position
    tokens_seen: int = 0  # global count of input tokens (padding excluded)
    trained_tokens: int = 0  # global count of tokens with a loss
    initial_eval_loss: Optional[float] = None
    last_eval_loss: Optional[float] = None




@dataclass
class RunParts:
    """Every stateful part of a training run: what a checkpoint saves and restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # launcher/training/optim.py's schedulers: state_dict / load_state_dict
    progress: Progress
    window: Window
    tokenizer: Any  # saved (with the HF config) for task=export; never restored
    task: Any  # the training task: state_dict / load_state_dict (DPO's reference log-probs)


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    """Frozen parameters (the base model of a LoRA run) are never checkpointed: they are rebuilt
    from `model.path` (or the seed) on resume, so a checkpoint holds only what trains."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


class Checkpointer:
    """Saves every `interval` steps and restores, for the run skeleton (launcher/training/trainer.py)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, world: World, steps_per_epoch: int, fingerprint: dict):
        self.world = world
        self.output_dir = output_dir
        self.enabled = cfg.train.checkpointing_enabled
        self.interval = cfg.train.save_steps or max(1, int(cfg.train.save_frequency * steps_per_epoch))
        self.keep_last_n = cfg.train.keep_last_n
        self.fingerprint = fingerprint
        # An explicit resume=<checkpoint> may change the batch layout (a resharded resume); any
        # resume the run's length (it continues: docs/runs.md).
        self.may_differ = {*length_keys(cfg), *(layout_keys(cfg) if cfg.resume not in ("auto", "never") else ())}
        self.resume_from = self._resume_source(cfg.resume)

    def _resume_source(self, resume: str) -> Optional[Path]:
        """`resume=auto`: the newest intact checkpoint of `output_dir` (if any); `never`; or a path.
        Collective (the ranks share the checksum reading)."""
        if resume == "never":
            return None
        if resume != "auto":
            problem = checkpoint_problem(Path(resume))
            if problem:
                raise ConfigError(f"resume={resume} cannot be loaded: {problem}")
            return Path(resume)
        damaged = []
        listed = on_rank0_then_all(lambda: run_dir.complete_checkpoints(self.output_dir), self.world)
        for path in reversed(listed):  # newest first
            problem = checkpoint_problem(path)
            if problem is None:
                if damaged and self.world.is_main:
                    aside = [run_dir.move_aside(p, "damaged").name for p, _ in damaged]
                    print(f"hydralm: warning: {_describe_damage(damaged)}; moved aside to {', '.join(aside)} (kept "
                          f"for you to look at, never loaded); resuming from {path} instead", file=sys.stderr, flush=True)
                barrier()  # every rank sees the damaged ones out of the listing before going on
                return path
            damaged.append((path, problem))
        if damaged:
            raise ConfigError(f"resume=auto: no intact checkpoint in {self.output_dir / run_dir.CHECKPOINTS_DIR}: "
                              f"{_describe_damage(damaged)}; move them aside, or use resume=never")
        return None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def save(self, parts: RunParts) -> Path:
        """Collective. Returns the new checkpoint directory. A save that fails on any rank removes
        its staging directory on every path out; a full disk stops the run with one line."""
        model, optimizer, progress, window = parts.model, parts.optimizer, parts.progress, parts.window
        started = time.perf_counter()
        final = run_dir.checkpoint_dir(self.output_dir, progress.step)
        staging = atomic.partial_path(final)
        if self.world.is_main:
            atomic.begin(final)
        barrier()
        try:
            digests, failure = self._write_rank_files(staging, model, optimizer, window), None
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
            digests, failure = {}, err
        error = None if failure is None else self._not_saved(failure, final)  # a full disk: RunStopped
        report = None if error is None else (str(error), isinstance(error, RunStopped))
        gathered = _all_gather((digests, report), self.world)  # every rank learns whether any failed
        reports = [report for _, report in gathered if report]
        if reports:
            if self.world.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            full_disk = [text for text, stopped in reports if stopped]
            if full_disk:
                raise RunStopped(full_disk[0])
            raise error or RuntimeError(f"another rank could not write its part of {final.name}: {reports[0][0]}")

        def publish() -> None:  # rank 0: the JSON state, the marker with every checksum, the swap
            try:
                save_hf_metadata(model, parts.tokenizer, run_dir.hf_dir(staging))
                atomic.write_json(staging / run_dir.TRAINER_STATE, {
                    "format_version": FORMAT_VERSION,
                    "world_size": self.world.size,
                    "progress": asdict(progress),
                    "scheduler": parts.scheduler.state_dict(),
                    "fingerprint": self.fingerprint,
                    "task": parts.task.state_dict(),
                }, fsync=True)
                shards = {name: digest for part, _ in gathered for name, digest in part.items()}  # hashed as written
                atomic.commit(staging, final, {"checksums": integrity.manifest(staging, shards)}, fsync=True)
            except Exception as err:
                shutil.rmtree(staging, ignore_errors=True)
                raise self._not_saved(err, final) from None
            self._prune(keep=final)

        on_rank0_then_all(publish, self.world)  # its failure reaches every rank
        if self.world.is_main:
            log.info("saved %s in %.2f s", final, time.perf_counter() - started)
        return final

    def _write_rank_files(self, staging: Path, model, optimizer, window: Window) -> dict[str, str]:
        """This rank's shards (DCP) and rank-<r>.json; the shards' digests, computed while writing."""
        model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
        writer = _ChecksummingWriter(staging)
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
        atomic.write_json(staging / f"rank-{self.world.rank}.json",
                          {"rng": rng_state(), "window": window.state_dict()}, fsync=True)
        return writer.fs.digests

    def _not_saved(self, err: Exception, final: Path) -> Exception:
        """A full disk becomes the run's one-line stop, naming what is kept; anything else as it is."""
        latest = run_dir.latest_checkpoint(self.output_dir)
        return atomic.out_of_space(err, final, kept=str(latest or "no checkpoint")) or err

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last_n` by step: every checkpoint here is this run's
        (launcher/store/claim.py, and `restore` removes those of an abandoned later branch)."""
        if self.keep_last_n is None:
            return
        for old in run_dir.complete_checkpoints(self.output_dir)[: -self.keep_last_n]:
            if old != keep:
                atomic.remove(old)

    def restore(self, parts: RunParts) -> bool:
        """Load `self.resume_from` into the parts (collective). False when starting fresh."""
        path = self.resume_from
        if path is None:
            return False
        model, optimizer, progress, window = parts.model, parts.optimizer, parts.progress, parts.window
        started = time.perf_counter()
        state = json.loads((path / run_dir.TRAINER_STATE).read_text())  # checked by checkpoint_problem
        run_dir.check_compatible(state["fingerprint"], self.fingerprint, path, ignore=self.may_differ)
        options = _state_options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        loaded = {"model": model_state, "optim": optim_state}
        _load(loaded, path)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                       options=options)
        parts.scheduler.load_state_dict(state["scheduler"])
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        self._restore_rank_state(path, state["world_size"], window)
        barrier()
        if self.world.is_main:
            run_dir.drop_metrics_after(self.output_dir, progress.step)
            abandoned = run_dir.remove_checkpoints_after(self.output_dir, progress.step)
            print(f"hydralm: resuming from {path} (step {progress.step}, epoch {progress.epoch}, "
                  f"{progress.epoch_samples} samples into the epoch; read in {time.perf_counter() - started:.2f} s)"
                  + (f"; removed the later checkpoints it abandons: {', '.join(p.name for p in abandoned)}"
                     if abandoned else ""), flush=True)
        barrier()
        parts.task.load_state_dict(state.get("task") or {})
        return True

    def _restore_rank_state(self, path: Path, saved_world_size: int, window: Window) -> None:
        """Same world size: each rank its own RNG and metric sums. Otherwise rank 0 carries the
        summed window (so the next logged means stay global) and new ranks reseed."""
        own = path / f"rank-{self.world.rank}.json"
        if saved_world_size == self.world.size:
            rank_state = json.loads(own.read_text())
            set_rng_state(rank_state["rng"])
            window.load_state_dict(rank_state["window"])
            return
        if own.is_file():
            set_rng_state(json.loads(own.read_text())["rng"])
        window.reset()
        if self.world.is_main:
            for r in range(saved_world_size):
                window.add_state_dict(json.loads((path / f"rank-{r}.json").read_text())["window"])


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Only the model part of a training checkpoint, into an already sharded model (collective)."""
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"checkpoint={path} cannot be loaded: {problem}")
    options = _state_options(model)  # a LoRA model: its adapters only, as saved
    loaded = {"model": get_model_state_dict(model, options=options)}
    _load(loaded, path)
    set_model_state_dict(model, loaded["model"], options=options)


# ---------------------------------------------------------------------- integrity


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint at `path` must not be loaded (a missing, truncated or corrupt file,
    invalid counters, metadata that is more than DCP's), or None. Collective: each rank hashes
    its share of the files."""
    path = Path(path)
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    files, problem = {}, None
    try:
        files = integrity.recorded_files(path)
        problem = integrity.size_problem(path, files) or integrity.digest_problem(path, files, sorted(files)[rank::size])
    except ValueError as err:
        problem = str(err)
    if size > 1:
        problems = [None] * size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    return problem or _content_problem(path, files)


def check_before_loading(path: Path, key: str) -> None:
    """Before any work: every recorded file is there with its size, the small ones (JSON state,
    configs, tokenizer, DCP metadata) are intact and hold valid values. The shards are hashed when
    they are loaded (`checkpoint_problem`)."""
    path = Path(path)
    try:
        files = integrity.recorded_files(path)
        small = [name for name, entry in files.items() if entry["bytes"] <= integrity.SMALL_FILE_BYTES]
        problem = (integrity.size_problem(path, files) or integrity.digest_problem(path, files, small)
                   or _content_problem(path, files))
    except ValueError as err:
        problem = str(err)
    if problem:
        raise ConfigError(f"{key}={path} cannot be loaded: {problem}")


def _content_problem(path: Path, files: dict) -> Optional[str]:
    """The JSON state's values and the DCP metadata of a checkpoint whose files are intact."""
    try:
        state = json.loads((path / run_dir.TRAINER_STATE).read_text())
        check_trainer_state(state, run_dir.checkpoint_step(path))
        missing = [f"rank-{r}.json" for r in range(state["world_size"]) if f"rank-{r}.json" not in files]
        if missing:
            return f"{missing[0]} is missing"
        metadata = read_metadata(path)
    except ValueError as err:
        return str(err)
    unlisted = {info.relative_path for info in metadata.storage_data.values()} - set(files)
    if unlisted:
        return f".metadata names {sorted(unlisted)[0]!r}, which is not a file of this checkpoint"
    return None


def check_trainer_state(state: dict, step_of_name: Optional[int]) -> None:
    """Raises ValueError naming the first field of trainer_state.json that no save could have written."""
    def fail(key, value, valid):
        raise ValueError(f"{run_dir.TRAINER_STATE}: {key}={value!r} is not valid ({valid})")

    def count(key, value, minimum):
        if type(value) is not int or value < minimum:
            fail(key, value, f"an integer >= {minimum}")

    if not isinstance(state, dict):
        fail("(the file)", type(state).__name__, "a JSON object")
    if state.get("format_version") != FORMAT_VERSION:
        fail("format_version", state.get("format_version"), f"{FORMAT_VERSION}; written by another hydralm version")
    count("world_size", state.get("world_size"), 1)
    progress = state.get("progress")
    names = [f.name for f in fields(Progress)]
    if not isinstance(progress, dict) or sorted(progress) != sorted(names):
        fail("progress", progress, f"an object with the keys {', '.join(names)}")
    count("progress.step", progress["step"], 1)
    if step_of_name is not None and progress["step"] != step_of_name:
        fail("progress.step", progress["step"], f"the directory is named for step {step_of_name}")
    for key in ("epoch", "epoch_samples", "tokens_seen", "trained_tokens"):
        count(f"progress.{key}", progress[key], 0)
    for key in ("initial_eval_loss", "last_eval_loss"):
        value = progress[key]
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            fail(f"progress.{key}", value, "a finite number or null")
    for key in ("scheduler", "fingerprint", "task"):
        if not isinstance(state.get(key), dict):
            fail(key, state.get(key), "a JSON object")


def _describe_damage(damaged: list[tuple[Path, str]]) -> str:
    (latest, problem), older = damaged[0], len(damaged) - 1
    return f"{latest} cannot be loaded ({problem})" + (f", nor {older} older checkpoint(s)" if older else "")


# ---------------------------------------------------------------------- DCP without code, with checksums


# What DCP's `.metadata` pickle may build: its metadata dataclasses, torch.Size, dtypes, layouts, paths.
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not checkpoint metadata (refused: "
                                     f"loading it could run code)")


def read_metadata(path: Path, rank: Optional[int] = None) -> Metadata:
    """DCP's metadata file of a checkpoint, built only from the allowed classes. Raises ValueError."""
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    try:
        with open(Path(path) / name, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as err:  # any malformed pickle: UnpicklingError, EOFError, TypeError, ...
        raise ValueError(f"{name} {err}" if isinstance(err, pickle.UnpicklingError)
                         else f"{name} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ValueError(f"{name} holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata read builds nothing but DCP's metadata (torch's own uses
    plain `pickle.load`)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path), kwargs.get("rank"))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainDataPlanner(DefaultLoadPlanner):
    """The default planner loads non-tensor values with `torch.load(weights_only=False)`; here a
    value must first load as plain data (numbers, strings, containers, tensors)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise ConfigError(f"checkpoint {self.path}: the value of {read_item.dest_index.fqn} is not plain data "
                              f"(refused: loading it could run code)") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _load(state: dict, path: Path) -> None:
    """dcp.load without running code from the checkpoint; a refusal is one ConfigError."""
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_PlainDataPlanner(path))
    except CheckpointException as err:
        refused = [failure for failure, _ in err.failures.values() if isinstance(failure, ConfigError)]
        if refused:
            raise refused[0] from None
        raise


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, hashing each file while it is written: `digests[name]`."""

    def __init__(self):
        super().__init__()
        self.digests: dict[str, str] = {}

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "r" in mode:
                yield stream
                return
            writer = integrity.HashingWriter(stream)
            try:
                yield writer
            except Exception as err:
                if writer.error is not None and writer.error is not err:
                    raise writer.error from err  # torch.save reports a failed write as "unexpected pos"
                raise
            self.digests[Path(path).name] = writer.hexdigest()

    def rename(self, path, new_path) -> None:  # the metadata is written to a temporary name first
        super().rename(path, new_path)
        if Path(path).name in self.digests:
            self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class _ChecksummingWriter(FileSystemWriter):
    def __init__(self, path: Path):
        super().__init__(path)
        self.fs = _HashingFileSystem()


def _all_gather(value, world: World) -> list:
    if world.size == 1:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered

