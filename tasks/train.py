"""The `train` task: fine-tune a causal LM with FSDP2 and export a HuggingFace model.

Read top to bottom: the `_setup_*` builders, then `train` (the loop), then `_train_step` (one
optimizer step over `gradient_accumulation_steps` micro-batches) and `eval_loss`.
"""

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from launcher.checkpoint import Checkpointer, Progress, config_fingerprint
from launcher.cluster import Preemption
from launcher.data import eval_loader, prepared_splits, tokenizer_fingerprint, train_loader
from launcher.distributed import World, distributed, seed_everything
from launcher.errors import ConfigError
from launcher.export import save_base_model, save_hf_model, save_lora_adapter
from launcher.loggers import open_loggers
from launcher.lora import (apply_lora, base_needs_saving, lora_enabled, parameter_counts,
                           trainable_parameters)
from launcher.host_memory import peak_host_memory_gib
from launcher.metrics import RunLog, flops_per_token, peak_flops_per_device, peak_memory_gib
from launcher.modeling import build_model, load_tokenizer, router_loss
from launcher.optim import build_optimizer, build_scheduler
from launcher.outputs import resolve_output_dir
from launcher.sharding import local_parameter_bytes, prepare_model, set_gradient_sync

log = logging.getLogger("hydralm")


def _setup_model(cfg: DictConfig, tokenizer, world: World, output_dir: Optional[Path] = None) -> torch.nn.Module:
    """Build, add LoRA adapters (peft=lora), then shard: decoder layers stay the FSDP units.

    The adapters apply to `model.path`; when that cannot rebuild the base (a random init), the
    base is first saved to `<output_dir>/base-model` and the adapters point there.
    """
    model = build_model(cfg.model, tokenizer, world, cfg.sharding.low_cpu_mem_usage)
    if lora_enabled(cfg.peft):
        base = cfg.model.path
        if output_dir is not None and base_needs_saving(cfg.model, model):
            base = str((output_dir / "base-model").resolve())
            if world.is_main:
                save_base_model(model, tokenizer, Path(base))
        model = apply_lora(model, cfg.peft, base)
    return prepare_model(model, cfg, world)


def _describe_parameters(trainable: int, total: int) -> str:
    return f"{trainable / 1e6:.3g}M of {total / 1e6:.3g}M parameters trainable ({trainable / total:.2%})"


def _steps_per_epoch(loader, cfg: DictConfig, world: World) -> int:
    steps = len(loader) // cfg.train.gradient_accumulation_steps
    if steps == 0:
        needed = world.size * cfg.data.train_bs * cfg.train.gradient_accumulation_steps
        raise ConfigError(
            f"the train split has {len(loader.dataset)} sequences, fewer than one optimizer step needs "
            f"(world size x data.train_bs x train.gradient_accumulation_steps = {needed})"
        )
    return steps


def train(cfg: DictConfig) -> dict:
    task_start = time.perf_counter()
    with distributed(cfg.sharding.backend) as world:
        seed_everything(cfg.train.seed)
        output_dir = resolve_output_dir(cfg, world)
        tokenizer = load_tokenizer(cfg.model)
        splits = prepared_splits(cfg, tokenizer, world)
        train_batches = train_loader(splits["train"], cfg, world, tokenizer.pad_token_id)
        eval_batches = eval_loader(splits["eval"], cfg, world, tokenizer.pad_token_id)
        steps_per_epoch = _steps_per_epoch(train_batches, cfg, world)
        total_steps = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)

        model = _setup_model(cfg, tokenizer, world, output_dir)
        trainable, total = parameter_counts(model)
        optimizer = build_optimizer(trainable_parameters(model), cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
        if world.is_main:
            log.info("model: %s", _describe_parameters(trainable, total))
        throughput = _Throughput(cfg, model, trainable, total, world)
        progress = Progress()
        # Since the last log, on this rank: loss sum, trained tokens, grad-norm sum, optimizer steps.
        window = torch.zeros(4, device=world.device)
        fingerprint = config_fingerprint(cfg, tokenizer_fingerprint(tokenizer), len(splits["train"]))
        checkpointer = Checkpointer(cfg, output_dir, world, steps_per_epoch, fingerprint)
        resumed = checkpointer.restore(model, optimizer, scheduler, progress, window)
        preemption = Preemption(world)
        run_log = RunLog(output_dir, total_steps, enabled=world.is_main,
                         loggers=open_loggers(cfg, output_dir) if world.is_main else (),
                         description=f"train ({trainable / 1e6:.3g}M/{total / 1e6:.3g}M params trainable)")

        def log_eval() -> float:
            loss = eval_loss(model, eval_batches, cfg, world)
            scheduler.observe_eval(loss)
            run_log.write({"step": progress.step, "epoch": progress.epoch, "eval_loss": loss,
                           "lr": scheduler.get_last_lr()[0], "tokens_seen": progress.tokens_seen})
            progress.last_eval_loss = loss
            return loss

        if not resumed:
            progress.initial_eval_loss = log_eval()
        start = window_start = time.perf_counter()
        time_to_first_step = None
        accumulation = cfg.train.gradient_accumulation_steps
        global_batch = world.size * cfg.data.train_bs * accumulation
        while progress.step < total_steps:
            # Positioned at the data consumed so far: mid-epoch after a resume, else the epoch start.
            train_batches.sampler.set_position(progress.epoch, progress.epoch_samples)
            batches = iter(train_batches)
            for _ in range(min(len(train_batches) // accumulation, total_steps - progress.step)):
                micro_batches = [next(batches) for _ in range(accumulation)]
                loss, tokens, grad_norm = _train_step(model, optimizer, micro_batches, cfg, world)
                scheduler.step()
                progress.step += 1
                if time_to_first_step is None:  # data, model, first eval and one step: what a user waits for
                    time_to_first_step = _seconds_since(task_start, world)
                progress.epoch_samples += global_batch
                window += torch.stack([loss, tokens, grad_norm, torch.ones_like(loss)])
                run_log.advance()
                if progress.step % cfg.train.logging_steps == 0 or progress.step == total_steps:
                    # One host sync per logging interval (others: checkpoints, and in SLURM jobs the
                    # per-step agreement on the preemption signal). The grad norm is global, so its
                    # rank sum over the rank sum of steps is its mean over the window.
                    loss_sum, token_count, grad_norm_sum, steps = _global_sum(window)
                    progress.tokens_seen += int(token_count)
                    seconds = time.perf_counter() - window_start
                    run_log.write({"step": progress.step, "epoch": progress.epoch,
                                   "train_loss": loss_sum / token_count, "lr": scheduler.get_last_lr()[0],
                                   "grad_norm": grad_norm_sum / steps,
                                   "tokens_seen": progress.tokens_seen,
                                   **throughput.row(token_count, seconds), "time_s": time.perf_counter() - start})
                    log_eval()
                    window_start = time.perf_counter()
                    window.zero_()
                stop = preemption.requested()  # SLURM's time-limit / preemption signal, on any rank
                if checkpointer.due(progress.step) or stop:
                    checkpointer.save(model, optimizer, scheduler, progress, window, tokenizer)
                if stop:
                    preemption.requeue()  # exits; the requeued job resumes from this checkpoint
            progress.epoch += 1
            progress.epoch_samples = 0
        wall_time = time.perf_counter() - start
        run_log.close()

        final_model = output_dir / "final-model"
        if lora_enabled(cfg.peft):
            save_lora_adapter(model, tokenizer, final_model, world, merge=cfg.export.merge_lora)
        else:
            save_hf_model(model, tokenizer, final_model, world)
        summary = {
            "final_model": str(final_model),
            "metrics": str(output_dir / "metrics.jsonl"),
            "initial_eval_loss": progress.initial_eval_loss,
            "final_eval_loss": progress.last_eval_loss,
            "steps": progress.step,
            "tokens_seen": progress.tokens_seen,
            "train_wall_time_s": wall_time,
            "time_to_first_step_s": time_to_first_step,
            "tokens_per_s": progress.tokens_seen / wall_time,
            "parameter_bytes_per_rank": local_parameter_bytes(model),
            "trainable_params": trainable,
            "total_params": total,
            "mfu_flops_per_token": throughput.flops_per_token,
            "peak_host_mem_gib": _per_rank(peak_host_memory_gib(), world),
        }
        if world.is_main:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            _print_summary(summary)
        return summary


class _Throughput:
    """tokens/s, tokens/s per device, MFU (when the device's peak FLOP/s is known) and peak memory."""

    def __init__(self, cfg: DictConfig, model, trainable: int, total: int, world: World):
        embedding = model.get_input_embeddings().weight.numel()
        self.flops_per_token = flops_per_token(model.config, total, trainable, embedding, cfg.train.max_seq_len)
        self.peak_flops = peak_flops_per_device(world.device, cfg.train.peak_flops_per_device)
        self.world = world

    def row(self, tokens: float, seconds: float) -> dict:
        per_device = tokens / seconds / self.world.size
        row = {"tokens_per_s": tokens / seconds, "tokens_per_s_per_device": per_device}
        if self.peak_flops:
            row["mfu"] = per_device * self.flops_per_token / self.peak_flops
        row["peak_mem_gib"] = peak_memory_gib(self.world.device)
        return row


def _train_step(model, optimizer, micro_batches: list[dict], cfg: DictConfig, world: World):
    """One optimizer step. Returns this rank's summed token loss and trained-token count, and the
    global gradient norm before clipping (device tensors).

    The loss is normalised by the number of trained tokens in the whole global batch, so
    accumulation and world size change nothing but speed. Nothing here waits for the device:
    the token count is computed and all-reduced on the device and never read on the host.
    """
    ignore = cfg.data.ignore_index
    micro_batches = [_to_device(batch, world.device) for batch in micro_batches]
    local_tokens = sum((batch["labels"][:, 1:] != ignore).sum() for batch in micro_batches).float()
    global_tokens = local_tokens.clone()
    if world.size > 1:
        dist.all_reduce(global_tokens)
    # FSDP averages gradients over ranks; this scale makes the result the global token mean.
    scale = world.size / global_tokens.clamp(min=1)
    step_loss = torch.zeros((), device=world.device)
    for i, batch in enumerate(micro_batches):
        set_gradient_sync(model, i == len(micro_batches) - 1)
        loss_sum = _token_loss_sum(model, batch, ignore, world.device)
        (loss_sum * scale).backward()
        step_loss += loss_sum.detach()
    # max_grad_norm=None: an infinite bound measures the norm without clipping.
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, local_tokens, _local(grad_norm)


def _local(value: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a replicated DTensor (FSDP2's gradient norm); no copy, no sync."""
    return value.to_local() if isinstance(value, DTensor) else value


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors, copied ahead of the forward (async from pinned host memory)."""
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def _token_loss_sum(model, batch: dict, ignore_index: int, device: torch.device) -> torch.Tensor:
    """Next-token cross-entropy summed over trained tokens (fp32 logits), plus, for a mixture of
    experts that computes its router's load-balancing loss, that term once per trained token: the
    token mean is then transformers' own loss of the batch.

    The labels are shifted rather than the logits, so the (batch, seq, vocab) logits are never
    sliced into a copy; the upcast is a no-op unless the model computes in bf16.
    """
    labels = batch["labels"].to(device, non_blocking=True)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    output = model(**model_inputs(batch, device))
    loss_sum = F.cross_entropy(output.logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=ignore_index,
                               reduction="sum")
    router = router_loss(model, output)
    return loss_sum if router is None else loss_sum + router * (next_labels != ignore_index).sum()


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The model's keyword arguments for a batch. With `data.document_mask`, the batch carries
    per-document `position_ids`: transformers then treats each document of a packed row as its
    own sequence (block-diagonal causal mask for sdpa/eager, varlen kernels for flash attention),
    which it does only without an attention mask and without a KV cache."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    return inputs


@torch.no_grad()
def eval_loss(model, loader, cfg: DictConfig, world: World) -> float:
    """Token-weighted mean eval loss over the whole eval split (all ranks)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=world.device)
    for i, batch in enumerate(loader):
        if cfg.train.max_eval_batches is not None and i >= cfg.train.max_eval_batches:
            break
        totals[0] += _token_loss_sum(model, batch, cfg.data.ignore_index, world.device)
        totals[1] += int((batch["labels"][:, 1:] != cfg.data.ignore_index).sum())
    model.train()
    if dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def _seconds_since(start: float, world: World) -> float:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)  # once per run: the step must really be done
    return time.perf_counter() - start


def _global_sum(value: torch.Tensor) -> list[float]:
    """Sum over ranks, read on the host."""
    if dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value.tolist()


def _per_rank(value: float, world: World) -> list[float]:
    """`value` of every rank, in rank order (collective)."""
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def _print_summary(summary: dict) -> None:
    print(
        f"\nhydralm: trained {summary['steps']} steps, {summary['tokens_seen']} tokens in "
        f"{summary['train_wall_time_s']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s)\n"
        f"  eval loss:   {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}\n"
        f"  final model: {summary['final_model']}\n"
        f"  metrics:     {summary['metrics']}",
        flush=True,
    )
