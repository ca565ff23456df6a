"""Training checkpoints: atomic, sharded, exactly resumable, refused when the run differs.

Layout of `<output_dir>/checkpoints/checkpoint-<step>/` (launcher/run_dir.py):

    .metadata, *.distcp   model + optimizer, sharded (torch.distributed.checkpoint); any world size loads it
    trainer_state.json    step/epoch counters, data position, scheduler state, run identity, task state
    rank-<r>.json         RNG states (python, numpy, torch, cuda) and unlogged metric sums of rank r
    hf/                   HF config, generation config and tokenizer (what `task=export` needs)
    COMPLETE              written last (launcher/atomic.py)

Every rank writes into the staging directory; rank 0 marks it complete and swaps it in, so a
kill at any moment leaves the previous checkpoint the latest.

Test hook (the only one): HYDRALM_TEST_KILL_IN_SAVE=<step> makes rank 0 SIGKILL itself inside the
save of that step, after the shards are written and before the checkpoint is complete.
"""

import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from launcher import atomic, run_dir
from launcher.distributed import World, barrier
from launcher.errors import ConfigError
from launcher.export import save_hf_metadata
from launcher.identity import layout_keys
from launcher.metrics import Window
from launcher.rng import rng_state, set_rng_state

FORMAT_VERSION = 2
KILL_HOOK = "HYDRALM_TEST_KILL_IN_SAVE"


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    epoch_samples: int = 0  # global samples of the current epoch consumed: the data position
    tokens_seen: int = 0  # global count of input tokens (padding excluded)
    trained_tokens: int = 0  # global count of tokens with a loss
    initial_eval_loss: Optional[float] = None
    last_eval_loss: Optional[float] = None


def resume_source(resume: str, output_dir: Path) -> Optional[Path]:
    """`resume=auto`: the latest complete checkpoint of `output_dir` (if any); `never`; or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return run_dir.latest_checkpoint(output_dir)
    return Path(resume)  # checked before any work (launcher/validate.py)


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    """Frozen parameters (the base model of a LoRA run) are never checkpointed: they are rebuilt
    from `model.path` (or the seed) on resume, so a checkpoint holds only what trains."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


class Checkpointer:
    """Saves every `interval` steps and restores, for the run skeleton (launcher/trainer.py)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, world: World, steps_per_epoch: int, fingerprint: dict):
        self.world = world
        self.output_dir = output_dir
        self.enabled = cfg.train.checkpointing_enabled
        self.interval = cfg.train.save_steps or max(1, int(cfg.train.save_frequency * steps_per_epoch))
        self.keep_last_n = cfg.train.keep_last_n
        self.fingerprint = fingerprint
        # An explicit resume=<checkpoint> may change the batch layout (a resharded resume).
        self.may_differ = layout_keys(cfg) if cfg.resume not in ("auto", "never") else set()
        chosen = [str(resume_source(cfg.resume, output_dir) or "")] if world.is_main else [None]
        if world.size > 1:
            dist.broadcast_object_list(chosen, src=0)
        self.resume_from = Path(chosen[0]) if chosen[0] else None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def save(self, model, optimizer, scheduler, progress: Progress, window: Window, tokenizer,
             task_state: dict) -> Path:
        """Collective. Returns the new checkpoint directory."""
        final = run_dir.checkpoint_dir(self.output_dir, progress.step)
        staging = atomic.partial_path(final)
        if self.world.is_main:
            atomic.begin(final)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
        atomic.write_json(staging / f"rank-{self.world.rank}.json",
                          {"rng": rng_state(), "window": window.state_dict()}, fsync=True)
        barrier()
        if self.world.is_main:
            save_hf_metadata(model, tokenizer, run_dir.hf_dir(staging))
            atomic.write_json(staging / run_dir.TRAINER_STATE, {
                "format_version": FORMAT_VERSION,
                "world_size": self.world.size,
                "progress": asdict(progress),
                "scheduler": scheduler.state_dict(),
                "fingerprint": self.fingerprint,
                "task": task_state,
            }, fsync=True)
            if os.environ.get(KILL_HOOK) == str(progress.step):
                os.kill(os.getpid(), signal.SIGKILL)
            atomic.commit(staging, final, fsync=True)
            self._prune(keep=final)
        barrier()
        return final

    def _prune(self, keep: Path) -> None:
        """Keep the newest `keep_last_n` by step: every checkpoint here is this run's
        (launcher/claim.py, and `restore` removes those of an abandoned later branch)."""
        if self.keep_last_n is None:
            return
        for old in run_dir.complete_checkpoints(self.output_dir)[: -self.keep_last_n]:
            if old != keep:
                atomic.remove(old)

    def restore(self, model, optimizer, scheduler, progress: Progress, window: Window) -> Optional[dict]:
        """Load `self.resume_from` into the given objects (collective). Returns the task state
        saved with it, or None when starting fresh."""
        path = self.resume_from
        if path is None:
            return None
        state = json.loads((path / run_dir.TRAINER_STATE).read_text())
        run_dir.check_compatible(state["fingerprint"], self.fingerprint, path, ignore=self.may_differ)
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
        if self.world.is_main:
            run_dir.drop_metrics_after(self.output_dir, progress.step)
            abandoned = run_dir.remove_checkpoints_after(self.output_dir, progress.step)
            print(f"hydralm: resuming from {path} (step {progress.step}, epoch {progress.epoch}, "
                  f"{progress.epoch_samples} samples into the epoch)"
                  + (f"; removed the later checkpoints it abandons: {', '.join(p.name for p in abandoned)}"
                     if abandoned else ""), flush=True)
        barrier()
        return state.get("task") or {}

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
    loaded = {"model": get_model_state_dict(model)}
    dcp.load(loaded, checkpoint_id=path)
    set_model_state_dict(model, loaded["model"])
