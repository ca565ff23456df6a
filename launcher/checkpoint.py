"""Training checkpoints: atomic, sharded, exactly resumable, refused when the config changed.

Layout of `<output_dir>/checkpoints/checkpoint-<step>/`:

    .metadata, *.distcp   model + optimizer, sharded (torch.distributed.checkpoint); any world size loads it
    trainer_state.json    step/epoch counters, data position, scheduler state, config fingerprint
    rank-<r>.json         RNG states (python, numpy, torch, cuda) and unlogged loss sums of rank r
    hf/                   HF config, generation config and tokenizer (what `task=export` needs)
    COMPLETE              written last

Every rank writes into `.checkpoint-<step>.partial/`; rank 0 adds the marker and renames it, so
a kill at any moment leaves the previous checkpoint the latest. Loading reads DCP and JSON only:
no pickled object from a checkpoint is ever executed.

Test hook (the only one): HYDRALM_TEST_KILL_IN_SAVE=<step> makes rank 0 SIGKILL itself inside the
save of that step, after the shards are written and before the checkpoint is complete.
"""

import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from launcher.distributed import World, barrier
from launcher.errors import ConfigError

CHECKPOINTS_DIR = "checkpoints"
PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
HF_DIR = "hf"
FORMAT_VERSION = 1
KILL_HOOK = "HYDRALM_TEST_KILL_IN_SAVE"

log = logging.getLogger("hydralm")


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    epoch_samples: int = 0  # global samples of the current epoch consumed: the data position
    tokens_seen: int = 0  # global count of trained (label) tokens
    initial_eval_loss: Optional[float] = None
    last_eval_loss: Optional[float] = None


# ---------------------------------------------------------------- finding checkpoints (no torch work)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / TRAINER_STATE).is_file()


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    root = output_dir / CHECKPOINTS_DIR
    found = [p for p in root.glob(PREFIX + "*") if is_complete(p)] if root.is_dir() else []
    return max(found, key=lambda p: int(p.name[len(PREFIX) :]), default=None)


def resume_source(resume: str, output_dir: Path) -> Optional[Path]:
    """`resume=auto`: the latest complete checkpoint of `output_dir` (if any); `never`; or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    return Path(resume)  # checked by launcher.validate


# ---------------------------------------------------------------- compatibility


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    """Frozen parameters (the base model of a LoRA run) are never checkpointed: they are rebuilt
    from `model.path` (or the seed) on resume, so a checkpoint holds only what trains."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def config_fingerprint(cfg: DictConfig, tokenizer_id: str, train_sequences: int) -> dict:
    """What a checkpoint's weights and data position mean; all of it must match to resume."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return _flatten({
        "model": {k: model.get(k) for k in ("name", "path", "config", "pad_vocab_to_multiple_of")},
        "tokenizer": tokenizer_id,
        "data": {
            **{k: OmegaConf.select(cfg.data, k) for k in (
                "source", "train_ds", "eval_ds", "load_path", "split", "eval_split", "eval_every", "data_field",
                "pre_pend", "add_bos_eos_tokens", "separator", "truncate", "packing_type", "overlap",
                "document_mask")},
            "max_seq_len": cfg.train.max_seq_len,
            "train_sequences": train_sequences,
        },
        "optimizer": cfg.optimizer["_target_"],
        "peft": OmegaConf.to_container(cfg.peft, resolve=True),
    })


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        details = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in differing[:4])
        raise ConfigError(
            f"resume: {path} was written with a different config ({details}); "
            f"use resume=never or another output_dir to start over"
        )


# ---------------------------------------------------------------- save / restore


class Checkpointer:
    """Saves every `interval` steps and restores, for the train task."""

    def __init__(self, cfg: DictConfig, output_dir: Path, world: World, steps_per_epoch: int, fingerprint: dict):
        self.world = world
        self.root = output_dir / CHECKPOINTS_DIR
        self.enabled = cfg.train.checkpointing_enabled
        self.interval = cfg.train.save_steps or max(1, int(cfg.train.save_frequency * steps_per_epoch))
        self.keep_last_n = cfg.train.keep_last_n
        self.fingerprint = fingerprint
        chosen = [str(resume_source(cfg.resume, output_dir) or "")] if world.is_main else [None]
        if world.size > 1:
            dist.broadcast_object_list(chosen, src=0)
        self.resume_from = Path(chosen[0]) if chosen[0] else None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def save(self, model, optimizer, scheduler, progress: Progress, window: torch.Tensor, tokenizer) -> Path:
        """Collective. Returns the new checkpoint directory."""
        started = time.perf_counter()
        final = self.root / f"{PREFIX}{progress.step:08d}"
        partial = self.root / f".{final.name}.partial"
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
        _write_json(partial / f"rank-{self.world.rank}.json", {"rng": _rng_state(), "window": window.tolist()})
        barrier()
        if self.world.is_main:
            from launcher.export import save_hf_metadata

            save_hf_metadata(model, tokenizer, partial / HF_DIR)
            _write_json(partial / TRAINER_STATE, {
                "format_version": FORMAT_VERSION,
                "world_size": self.world.size,
                "progress": asdict(progress),
                "scheduler": scheduler.state_dict(),
                "fingerprint": self.fingerprint,
            })
            if os.environ.get(KILL_HOOK) == str(progress.step):
                os.kill(os.getpid(), signal.SIGKILL)
            (partial / COMPLETE).touch()
            _fsync_dir(partial)
            if final.exists():  # a rerun with resume=never over an old output_dir
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            self._prune(keep=final)
        barrier()
        if self.world.is_main:
            log.info("saved %s in %.2f s", final, time.perf_counter() - started)
        return final

    def _prune(self, keep: Path) -> None:
        for stale in self.root.glob(f".{PREFIX}*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep_last_n is None:
            return
        complete = sorted((p for p in self.root.glob(PREFIX + "*") if is_complete(p)), key=lambda p: p.name)
        for old in complete[: -self.keep_last_n]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, model, optimizer, scheduler, progress: Progress, window: torch.Tensor) -> bool:
        """Load `self.resume_from` into the given objects (collective). False when starting fresh."""
        path = self.resume_from
        if path is None:
            return False
        started = time.perf_counter()
        state = json.loads((path / TRAINER_STATE).read_text())
        check_compatible(state["fingerprint"], self.fingerprint, path)
        options = _state_options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                       options=options)
        scheduler.load_state_dict(state["scheduler"])
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        self._restore_rank_state(path, state["world_size"], window)
        barrier()
        if self.world.is_main:
            _drop_metrics_after(self.root.parent / "metrics.jsonl", progress.step)
            print(f"hydralm: resuming from {path} (step {progress.step}, epoch {progress.epoch}, "
                  f"{progress.epoch_samples} samples into the epoch; read in {time.perf_counter() - started:.2f} s)",
                  flush=True)
        return True

    def _restore_rank_state(self, path: Path, saved_world_size: int, window: torch.Tensor) -> None:
        """Same world size: each rank its own RNG and loss sums. Otherwise rank 0 carries the summed
        loss window (so the next logged train loss is still the global mean) and new ranks reseed."""
        own = path / f"rank-{self.world.rank}.json"
        if saved_world_size == self.world.size:
            rank_state = json.loads(own.read_text())
            _set_rng_state(rank_state["rng"])
            window.copy_(torch.tensor(rank_state["window"], dtype=window.dtype))
            return
        if own.is_file():
            _set_rng_state(json.loads(own.read_text())["rng"])
        window.zero_()
        if self.world.is_main:
            for r in range(saved_world_size):
                window += torch.tensor(json.loads((path / f"rank-{r}.json").read_text())["window"], dtype=window.dtype)


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Only the model part of a training checkpoint, into an already sharded model (collective)."""
    loaded = {"model": get_model_state_dict(model)}
    dcp.load(loaded, checkpoint_id=path)
    set_model_state_dict(model, loaded["model"])


def hf_dir(path: Path) -> Path:
    return Path(path) / HF_DIR


def load_task_model(cfg: DictConfig, world: World):
    """For evaluate/export: (model config, tokenizer, sharded model) of `checkpoint`, or of `model`.

    A training checkpoint's weights replace the random init that launcher.validate.model_config
    builds from its `hf/` config."""
    from launcher.modeling import build_model, load_tokenizer
    from launcher.sharding import prepare_model
    from launcher.validate import model_config

    model_cfg = model_config(cfg)
    tokenizer = load_tokenizer(model_cfg)
    from_checkpoint = cfg.checkpoint is not None and is_complete(Path(cfg.checkpoint))
    # From a training checkpoint no rank initialises weights: each allocates its shards and reads them.
    model = build_model(model_cfg, tokenizer, world, cfg.sharding.low_cpu_mem_usage, empty=from_checkpoint)
    model = prepare_model(model, cfg, world, weights_follow=from_checkpoint)
    if from_checkpoint:
        load_model_weights(model, Path(cfg.checkpoint))
    return model_cfg, tokenizer, model


# ---------------------------------------------------------------- helpers


def _drop_metrics_after(metrics: Path, step: int) -> None:
    """Rows the interrupted run logged after its checkpoint are logged again by the resumed run."""
    if metrics.is_file():
        kept = [row for row in metrics.read_text().splitlines() if _logged_step(row) <= step]
        metrics.write_text("".join(row + "\n" for row in kept))


def _logged_step(row: str) -> float:
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by the kill
        return float("inf")


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
