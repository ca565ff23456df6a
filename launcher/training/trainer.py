"""The run skeleton: everything a training run does, for any training task.

A training task (tasks/train.py, tasks/dpo.py) supplies a `TrainingTask`: its datasets, how rows
become batches, and a micro-batch's loss and metrics. `Trainer(cfg, task).run()` does the rest,
read top to bottom:

    setup    process group, seed, output directory (claimed: launcher/store/claim.py), tokenizer,
             data, model (LoRA, FSDP2), optimizer and schedule, checkpoint restore, the task's
             own setup, loggers
    loop     `optimizer_step` over `train.gradient_accumulation_steps` micro-batches; every
             `train.logging_steps` a train row and an eval row; checkpoints; stop signals
             (SIGINT, SIGTERM, SLURM's requeue signal); a non-finite loss or gradient norm
             stops the run before anything is saved from it
    finish   the final model, summary.json and the printed summary
"""

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor

from launcher.data.loaders import eval_loader, train_loader
from launcher.data.preprocessing import tokenizer_fingerprint
from launcher.distributed import World, distributed, on_rank0_then_all, seed_everything
from launcher.errors import ConfigError, RunStopped, at_least
from launcher.job_log import announce
from launcher.model.device_defaults import apply_device_defaults
from launcher.model.lora import apply_lora, base_needs_saving, lora_enabled, parameter_counts, trainable_parameters
from launcher.model.losses import trained_tokens
from launcher.model.modeling import build_model, load_tokenizer
from launcher.model.precision import cast_parameters, weight_dtype
from launcher.model.sharding import local_parameter_bytes, prepare_model, set_gradient_sync
from launcher.store import atomic, run_dir
from launcher.store.identity import TOKENIZER, TRAIN_SEQUENCES, length_keys, run_identity
from launcher.store.outputs import claimed_output_dir
from launcher.training.checkpoint import Checkpointer, Progress, RunParts
from launcher.training.export import save_base_model, save_final_model
from launcher.training.host_memory import peak_host_memory_gib
from launcher.training.loggers import open_loggers
from launcher.training.metrics import RunLog, Throughput, Window
from launcher.training.objective import check_objective
from launcher.training.optim import build_optimizer, build_scheduler, parameter_groups
from launcher.training.preemption import StopSignals

log = logging.getLogger("hydralm")


class TrainingTask:
    """What a training task supplies to the Trainer; subclass it and override what differs.

    Batches are dicts of tensors. Rows mark trained tokens in `*labels` columns, and collators
    add `input_tokens` (real tokens the model reads, padding excluded), which throughput counts.
    """

    name = "train"  # the progress bar's label
    metrics: tuple[str, ...] = ()  # names of the extra sums `loss` returns; logged as means per weight

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def datasets(self, tokenizer, world: World) -> dict[str, Dataset]:
        """{"train": rows, "eval": rows}."""
        raise NotImplementedError

    def collator(self, tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def weight(self, batch: dict) -> torch.Tensor:
        """What the loss is averaged over in the global batch (trained tokens, pairs, ...)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's summed loss and the sums of `metrics` (device tensors)."""
        raise NotImplementedError

    def setup(self, model, trainer: "Trainer") -> None:
        """After the model is built and restored, before the first eval (a reference model...)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state a checkpoint must carry for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def trained_tokens(self, batch: dict) -> torch.Tensor:
        ignore = self.cfg.data.ignore_index
        return sum(trained_tokens(labels, ignore) for name, labels in batch.items() if name.endswith("labels"))


@dataclass
class StepResult:
    """One optimizer step on this rank (device tensors; the grad norm is global)."""
    loss: torch.Tensor
    weight: torch.Tensor
    input_tokens: torch.Tensor
    trained_tokens: torch.Tensor
    metrics: dict[str, torch.Tensor]
    grad_norm: torch.Tensor


class Trainer:
    def __init__(self, cfg: DictConfig, task: TrainingTask):
        check_objective(cfg, task.metrics)
        self.cfg, self.task = cfg, task

    def run(self) -> dict:
        cfg = self.cfg
        task_start = time.perf_counter()
        with distributed(cfg.sharding.backend, cfg.sharding.collective_timeout_s) as world, claimed_output_dir(cfg, world) as output_dir:
            self.world, self.output_dir = world, output_dir
            finished = on_rank0_then_all(self._finished_run, world)
            if finished is not None:
                return finished
            seed_everything(cfg.train.seed)
            self.tokenizer = load_tokenizer(cfg.model)
            self._setup_data()
            self.model = build_training_model(cfg, self.tokenizer, world, self.output_dir)
            self._setup_optimization()
            resumed = self._setup_checkpointing()
            self._check_length()
            self.last_eval = {"eval_loss": self.progress.last_eval_loss}
            self.task.setup(self.model, self)
            self._setup_logging()
            if not resumed:
                self.progress.initial_eval_loss = self._log_eval()
            self.start = time.perf_counter()
            self.time_to_first_step = None
            try:
                with StopSignals(world) as self.signals:
                    self._train(task_start)
                self._stop_if_nonfinite()  # the final model is never non-finite
            except RunStopped:
                self.run_log.close()
                raise
            return self._finish()

    # ------------------------------------------------------------------ setup

    def _finished_run(self) -> Optional[dict]:
        """The summary of this run when output_dir holds it finished (resume=auto) at the same
        length: rerunning the command changes nothing. With train.max_steps/train.epochs changed it
        continues (docs/runs.md). Otherwise summary.json goes: from now on the run is unfinished."""
        summary = run_dir.finished_summary(self.output_dir)
        length = length_keys(self.cfg)
        if summary is not None and self.cfg.resume == "auto":
            if summary.get("length", length) == length:
                announce(f"hydralm: {self.output_dir} holds this run, finished at step {summary['steps']} "
                         f"({run_dir.SUMMARY}): nothing to train (overwrite=true trains it again)")
                return summary
            changed = {key: (summary["length"].get(key), value) for key, value in length.items()
                       if summary["length"].get(key) != value}
            check_length_change(self.cfg, self.output_dir)
            changes = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            announce(f"hydralm: {self.output_dir} holds this run, finished at step {summary['steps']}; "
                     f"{changes}: it continues from its latest checkpoint")
        (self.output_dir / run_dir.SUMMARY).unlink(missing_ok=True)
        return None

    def _check_length(self) -> None:  # an unfinished run (a finished one: check_length_change)
        """A run's length may grow, never shrink below the step it has reached."""
        if self.progress.step > self.total_steps:
            raise ConfigError(
                f"train.max_steps={self.cfg.train.max_steps} train.epochs={self.cfg.train.epochs} give "
                f"{self.total_steps} steps, fewer than the {self.progress.step} this run has trained "
                f"(output_dir={self.output_dir}): a run's length may only grow; use another output_dir")

    def _setup_data(self) -> None:
        cfg, world = self.cfg, self.world
        self.splits = self.task.datasets(self.tokenizer, world)
        collate = self.task.collator(self.tokenizer)
        self.train_batches = train_loader(self.splits["train"], cfg, world, collate)
        self.eval_batches = eval_loader(self.splits["eval"], cfg, world, collate)
        accumulation = cfg.train.gradient_accumulation_steps
        self.steps_per_epoch = len(self.train_batches) // accumulation
        self.global_batch = world.size * cfg.data.train_bs * accumulation
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the train split has {len(self.splits['train'])} sequences, fewer than one optimizer step needs "
                f"(world size x data.train_bs x train.gradient_accumulation_steps = {self.global_batch})"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def _setup_optimization(self) -> None:
        self.trainable, self.total = parameter_counts(self.model)
        groups = parameter_groups(self.model, self.cfg.optimizer, self.cfg.train.decay_norms_and_biases)
        self.optimizer = build_optimizer(groups, self.cfg.optimizer, self.cfg.train.precision)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.scheduler, self.total_steps)
        if self.world.is_main:
            log.info("model: %s", _describe_parameters(self.trainable, self.total))

    def _setup_checkpointing(self) -> bool:
        self.progress = Progress()
        # Since the last log, on this rank: what `optimizer_step` returns, summed.
        self.window = Window(("loss", "weight", "input_tokens", "trained_tokens", "grad_norm", "steps",
                              *self.task.metrics), self.world.device)
        fingerprint = run_fingerprint(self.cfg, self.tokenizer, len(self.splits["train"]))
        self.checkpointer = Checkpointer(self.cfg, self.output_dir, self.world, self.steps_per_epoch, fingerprint)
        self.parts = RunParts(self.model, self.optimizer, self.scheduler, self.progress, self.window, self.tokenizer,
                              self.task)
        resumed = self.checkpointer.restore(self.parts)
        self.resumed_at_step = self.progress.step if resumed else None
        # Input tokens this process trains on, for throughput; the restored window holds the
        # earlier process's unlogged tokens, which its next row must not count as this one's.
        self.process_tokens = 0
        self.inherited_tokens = self.window.global_sums()["input_tokens"] if resumed else 0.0
        self.step_lr = self.scheduler.get_last_lr()[0]  # the lr of the step a row reports
        self.nonfinite = FirstNonFinite(self.world)
        return resumed

    def _setup_logging(self) -> None:
        world = self.world
        self.throughput = Throughput(self.model, self.trainable, self.total, self.cfg.train.max_seq_len, world,
                                     self.cfg.train.peak_flops_per_device)
        loggers = open_loggers(self.cfg, self.output_dir) if world.is_main else ()
        self.run_log = RunLog(self.output_dir, self.total_steps, enabled=world.is_main, loggers=loggers,
                              description=f"{self.task.name} ({self.trainable / 1e6:.3g}M/{self.total / 1e6:.3g}M "
                                          f"params trainable)", start_step=self.progress.step,
                              append=self.resumed_at_step is not None)

    # ------------------------------------------------------------------ the loop

    def _train(self, task_start: float) -> None:
        cfg, progress = self.cfg, self.progress
        accumulation = cfg.train.gradient_accumulation_steps
        window_start = time.perf_counter()
        while progress.step < self.total_steps:
            # Positioned at the data consumed so far: mid-epoch after a resume, else the epoch start.
            self.train_batches.sampler.set_position(progress.epoch, progress.epoch_samples)
            batches = iter(self.train_batches)
            for _ in range(min(len(self.train_batches) // accumulation, self.total_steps - progress.step)):
                micro_batches = [next(batches) for _ in range(accumulation)]
                step = optimizer_step(self.model, self.optimizer, micro_batches, self.task, self.world)
                self.step_lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                progress.step += 1
                progress.epoch_samples += self.global_batch
                if self.time_to_first_step is None:  # data, model, first eval, one step: what a user waits for
                    self.time_to_first_step = _seconds_since(task_start, self.world)
                self.nonfinite.observe(progress.step, step.loss, step.grad_norm)
                self.window.add(loss=step.loss, weight=step.weight, input_tokens=step.input_tokens,
                                trained_tokens=step.trained_tokens, grad_norm=step.grad_norm,
                                steps=torch.ones_like(step.loss), **step.metrics)
                self.run_log.advance()
                if progress.step % cfg.train.logging_steps == 0 or progress.step == self.total_steps:
                    self._stop_if_nonfinite()
                    self._log_train(time.perf_counter() - window_start)
                    self._log_eval()
                    window_start = time.perf_counter()
                stop = self.signals.at_step_boundary()  # SIGINT, SIGTERM or SLURM's requeue signal, on any rank
                saved = None
                if self.checkpointer.due(progress.step) or (stop and self.signals.saves(stop, self.checkpointer.enabled)):
                    self._stop_if_nonfinite()
                    saved = self.checkpointer.save(self.parts)
                if stop:
                    self.signals.stop(stop, progress.step, saved)  # requeues, or raises RunStopped
            progress.epoch += 1
            progress.epoch_samples = 0

    def _log_train(self, seconds: float) -> None:
        """One host sync per logging interval. The grad norm is global, so its rank sum over the
        rank sum of steps is its mean over the window."""
        sums = self.window.global_sums()
        self.window.reset()
        progress = self.progress
        progress.tokens_seen += int(sums["input_tokens"])
        progress.trained_tokens += int(sums["trained_tokens"])
        tokens = sums["input_tokens"] - self.inherited_tokens
        self.process_tokens += int(tokens)
        self.inherited_tokens = 0.0
        weight = max(sums["weight"], 1.0)
        self.run_log.write({
            "step": progress.step, "epoch": progress.epoch, "train_loss": sums["loss"] / weight,
            **{name: sums[name] / weight for name in self.task.metrics},
            "lr": self.step_lr, "grad_norm": sums["grad_norm"] / sums["steps"],
            "tokens_seen": progress.tokens_seen, "trained_tokens": progress.trained_tokens,
            **self.throughput.row(tokens, seconds), "time_s": time.perf_counter() - self.start,
        })

    def _log_eval(self) -> float:
        result = evaluate(self.model, self.eval_batches, self.task, self.world, self.cfg.train.max_eval_batches)
        self.scheduler.observe_eval(result["eval_loss"])
        progress = self.progress
        self.run_log.write({"step": progress.step, "epoch": progress.epoch, **result,
                            "lr": self.step_lr, "tokens_seen": progress.tokens_seen})
        progress.last_eval_loss = result["eval_loss"]
        self.last_eval = result
        return result["eval_loss"]

    # ------------------------------------------------------------------ finish

    def _stop_if_nonfinite(self) -> None:
        """Before a row is logged and before anything is saved (one host read)."""
        found = self.nonfinite.first()
        if found:
            what, step = found
            latest = run_dir.latest_checkpoint(self.output_dir)
            raise RunStopped(
                f"error: the {what} {'were' if ' and ' in what else 'was'} not finite at step {step}; stopped without saving the model from that "
                f"step on (latest checkpoint: {latest or 'none'}). Lower optimizer.lr, set train.max_grad_norm, "
                f"or check the data")

    def _finish(self) -> dict:
        world, progress = self.world, self.progress
        wall_time = time.perf_counter() - self.start
        self.run_log.close()
        final_model = self.output_dir / run_dir.FINAL_MODEL
        save_final_model(self.model, self.tokenizer, final_model, world, self.cfg.export.merge_lora)
        summary = {
            "task": self.task.name,
            "final_model": str(final_model),
            "metrics": str(self.output_dir / run_dir.METRICS),
            "initial_eval_loss": progress.initial_eval_loss,
            "final_eval_loss": progress.last_eval_loss,
            "final_eval": self.last_eval,
            "steps": progress.step,
            "length": length_keys(self.cfg),  # raised, the run continues (_finished_run)
            "resumed_at_step": self.resumed_at_step,
            "tokens_seen": progress.tokens_seen,
            "trained_tokens": progress.trained_tokens,
            "process_tokens": self.process_tokens,  # what this process trained on (after a resume: since it)
            "train_wall_time_s": wall_time,
            "time_to_first_step_s": self.time_to_first_step,
            "tokens_per_s": self.process_tokens / wall_time,
            "parameter_bytes_per_rank": local_parameter_bytes(self.model),
            "trainable_params": self.trainable,
            "total_params": self.total,
            "mfu_flops_per_token": self.throughput.flops_per_token,
            "peak_host_mem_gib": _per_rank(peak_host_memory_gib(), world),
        }
        if world.is_main:
            atomic.write_json(self.output_dir / run_dir.SUMMARY, summary)
            _print_summary(summary)
        return summary


# ---------------------------------------------------------------------- one optimizer step


class FirstNonFinite:
    """The first step whose loss or gradient norm was not finite (NaN, inf), kept on the device:
    `observe` adds three tiny device operations per step and never waits for the device; `first`
    (one all-reduce, one host read) runs at log points and before saves and the export."""

    NEVER = 2**62

    def __init__(self, world: World):
        self.world = world
        self.steps = torch.full((2,), self.NEVER, dtype=torch.int64, device=world.device)  # loss, grad norm

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values = [on_device(value.detach().float(), self.steps.device) for value in (loss, grad_norm)]
        finite = torch.stack(values).isfinite()
        self.steps = torch.minimum(self.steps, torch.where(finite, self.NEVER, step))

    def first(self) -> Optional[tuple[str, int]]:
        """("loss" / "gradient norm" / "loss and gradient norm", step), or None: on every rank."""
        steps = self.steps.clone()
        if self.world.size > 1:
            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        loss_step, norm_step = steps.tolist()
        step = min(loss_step, norm_step)
        if step == self.NEVER:
            return None
        names = [name for name, at in (("loss", loss_step), ("gradient norm", norm_step)) if at == step]
        return " and ".join(names), step


def optimizer_step(model, optimizer, micro_batches: list[dict], task: TrainingTask, world: World) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The loss is normalised by the task's weight (trained tokens, pairs) of the whole global
    batch, so accumulation and world size change nothing but speed. Nothing here waits for the
    device: the weight is computed and all-reduced on the device and never read on the host.
    """
    micro_batches = [_to_device(batch, world.device) for batch in micro_batches]
    local_weight = sum(task.weight(batch) for batch in micro_batches).float()
    input_tokens = sum(batch["input_tokens"] for batch in micro_batches)
    trained = sum(task.trained_tokens(batch) for batch in micro_batches)
    global_weight = local_weight.clone()
    if world.size > 1:
        dist.all_reduce(global_weight)
    # FSDP averages gradients over ranks; this scale makes the result the global mean per weight.
    scale = world.size / global_weight.clamp(min=1)
    step_loss = torch.zeros((), device=world.device)
    step_metrics = {name: torch.zeros((), device=world.device) for name in task.metrics}
    for i, batch in enumerate(micro_batches):
        set_gradient_sync(model, i == len(micro_batches) - 1)
        loss_sum, metrics = task.loss(model, batch)
        (loss_sum * scale).backward()
        step_loss += loss_sum.detach()
        for name in task.metrics:
            step_metrics[name] += metrics[name].detach()
    # max_grad_norm=None: an infinite bound measures the norm without clipping.
    max_norm = task.cfg.train.max_grad_norm if task.cfg.train.max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # sharding.cpu_offload: the gradients, so their norm, live on the host; every step value the
    # loop keeps is on the compute device from here on.
    return StepResult(step_loss, local_weight, input_tokens, trained, step_metrics, on_device(grad_norm, world.device))


@torch.no_grad()
def evaluate(model, loader, task: TrainingTask, world: World, max_batches: Optional[int] = None) -> dict[str, float]:
    """`eval_loss` (and `eval_<metric>`): means per weight over the whole eval split, all ranks."""
    model.eval()
    totals = torch.zeros(2 + len(task.metrics), dtype=torch.float64, device=world.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = _to_device(batch, world.device)
        loss_sum, metrics = task.loss(model, batch)
        values = [loss_sum, task.weight(batch), *(metrics[n] for n in task.metrics)]
        totals += torch.stack([v.double() for v in values])
    model.train()
    if dist.get_world_size() > 1:
        dist.all_reduce(totals)
    loss, weight, *metric_sums = totals.tolist()
    return {"eval_loss": loss / weight, **{f"eval_{n}": s / weight for n, s in zip(task.metrics, metric_sums)}}


# ---------------------------------------------------------------------- builders and checks


def check_length_change(cfg: DictConfig, output_dir: Optional[Path] = None) -> None:
    """Before any work (and before Hydra writes .hydra/ into output_dir): a finished run in
    output_dir is continued only to a greater length (docs/runs.md)."""
    output_dir = output_dir or (Path(cfg.output_dir) if cfg.get("output_dir") else None)
    summary = run_dir.finished_summary(output_dir) if output_dir is not None and output_dir.is_dir() else None
    if summary is None or cfg.resume != "auto" or cfg.get("overwrite") or not isinstance(summary.get("length"), dict):
        return
    train, old_epochs = cfg.train, summary["length"].get("train.epochs") or 0
    if train.epochs < old_epochs:
        key, old = "train.epochs", old_epochs
    elif train.max_steps is not None and train.max_steps < summary["steps"]:
        key, old = "train.max_steps", f"{summary['length'].get('train.max_steps')} ({summary['steps']} steps trained)"
    else:
        return
    raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} is below this finished run's {key}={old} "
                      f"(output_dir={output_dir}): a run's length may only grow; use another output_dir")


def check_train(train: DictConfig) -> None:
    """The `train` keys the loop depends on."""
    if not 0 <= train.seed < 2**32:
        raise ConfigError(f"train.seed={train.seed} must be in [0, 2**32 - 1] (the range numpy's generator takes)")
    at_least(train.epochs, 1, "train.epochs")
    at_least(train.max_steps, 1, "train.max_steps")
    at_least(train.gradient_accumulation_steps, 1, "train.gradient_accumulation_steps")
    at_least(train.logging_steps, 1, "train.logging_steps")
    at_least(train.max_seq_len, 8, "train.max_seq_len")
    at_least(train.max_eval_batches, 1, "train.max_eval_batches")
    at_least(train.activation_checkpointing_every, 1, "train.activation_checkpointing_every")
    if train.compile not in ("auto", True, False):
        raise ConfigError(f"train.compile={train.compile} must be auto (on for CUDA, off for CPU), true or false")
    if train.max_grad_norm is not None and not (math.isfinite(train.max_grad_norm) and train.max_grad_norm > 0):
        raise ConfigError(f"train.max_grad_norm={train.max_grad_norm} must be a finite number > 0 "
                          f"(or null to disable clipping)")
    if not 0 < train.save_frequency <= 1:
        raise ConfigError(f"train.save_frequency={train.save_frequency} must be in (0, 1]")
    at_least(train.save_steps, 1, "train.save_steps")
    at_least(train.keep_last_n, 1, "train.keep_last_n")



def build_training_model(cfg: DictConfig, tokenizer, world: World, output_dir: Optional[Path] = None):
    """Build, add LoRA adapters (peft=lora), then shard: decoder layers stay the FSDP units.

    The adapters apply to `model.path`; when that cannot rebuild the base (a random init), the
    base is first saved to `<output_dir>/base-model` and the adapters point there.
    """
    apply_device_defaults(cfg)  # a no-op after run_task's; callers that compose a config get the same rule
    model = build_model(cfg.model, tokenizer, world, cfg.sharding.low_cpu_mem_usage,
                        dtype=weight_dtype(cfg.train.precision))
    if lora_enabled(cfg.peft):
        base = cfg.model.path
        if output_dir is not None and base_needs_saving(cfg.model, model):
            base = str((output_dir / run_dir.BASE_MODEL).resolve())
            if world.is_main:
                save_base_model(model, tokenizer, Path(base))
        model = cast_parameters(apply_lora(model, cfg.peft, base), weight_dtype(cfg.train.precision))
    return prepare_model(model, cfg, world)


def run_fingerprint(cfg: DictConfig, tokenizer, train_sequences: int) -> dict:
    """What a checkpoint's weights and data position mean: every setting the schema marks as
    affecting the run (launcher/store/identity.py), the tokenizer and the train split's size."""
    return {**run_identity(cfg), TOKENIZER: tokenizer_fingerprint(tokenizer), TRAIN_SEQUENCES: train_sequences}


# ---------------------------------------------------------------------- helpers


def _per_rank(value: float, world: World) -> list[float]:
    """`value` of every rank, in rank order (collective)."""
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def on_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`value` as a plain tensor on `device`: a replicated DTensor's local tensor (FSDP2's gradient
    norm), copied there when it lives elsewhere (the host, under sharding.cpu_offload)."""
    value = value.to_local() if isinstance(value, DTensor) else value
    return value.to(device, non_blocking=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors, copied ahead of the forward (async from pinned host memory)."""
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def _seconds_since(start: float, world: World) -> float:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)  # once per run: the step must really be done
    return time.perf_counter() - start


def _describe_parameters(trainable: int, total: int) -> str:
    return f"{trainable / 1e6:.3g}M of {total / 1e6:.3g}M parameters trainable ({trainable / total:.2%})"


def _print_summary(summary: dict) -> None:
    resumed = summary["resumed_at_step"]
    trained = (f"trained {summary['steps']} steps" if resumed is None
               else f"resumed at step {resumed}, trained {summary['steps'] - resumed} more steps")
    task_metrics = ", ".join(f"{name.removeprefix('eval_')} {value:.4g}"
                             for name, value in summary["final_eval"].items() if name != "eval_loss")
    announce(
        f"\nhydralm: {trained}, {summary['process_tokens']} tokens in "
        f"{summary['train_wall_time_s']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s)\n"
        f"  eval loss:   {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}\n"
        + (f"  final eval:  {task_metrics}\n" if task_metrics else "")
        + f"  final model: {summary['final_model']}\n"
        f"  metrics:     {summary['metrics']}"
    )
