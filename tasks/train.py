"""The `train` task: fine-tune a causal LM with FSDP2 and export a HuggingFace model.

Read top to bottom: the `_setup_*` builders, then `train` (the loop), then `_train_step` (one
optimizer step over `gradient_accumulation_steps` micro-batches) and `eval_loss`.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig

from launcher.data import eval_loader, prepared_splits, train_loader
from launcher.distributed import World, distributed, seed_everything
from launcher.errors import ConfigError
from launcher.export import save_hf_model
from launcher.metrics import RunLog
from launcher.modeling import build_model, load_tokenizer
from launcher.optim import build_optimizer, build_scheduler
from launcher.outputs import resolve_output_dir
from launcher.sharding import prepare_model, set_gradient_sync

log = logging.getLogger("hydralm")


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    tokens_seen: int = 0  # global count of trained (label) tokens


def _setup_model(cfg: DictConfig, tokenizer, world: World) -> torch.nn.Module:
    model = build_model(cfg.model, tokenizer, world.device)
    return prepare_model(model, cfg, world)


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

        model = _setup_model(cfg, tokenizer, world)
        optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
        run_log = RunLog(output_dir, total_steps, enabled=world.is_main)
        progress = Progress()

        def log_eval() -> float:
            loss = eval_loss(model, eval_batches, cfg, world)
            scheduler.observe_eval(loss)
            run_log.write({"step": progress.step, "epoch": progress.epoch, "eval_loss": loss,
                           "lr": scheduler.get_last_lr()[0], "tokens_seen": progress.tokens_seen})
            return loss

        initial_eval_loss = log_eval()
        start = window_start = time.perf_counter()
        window_loss = torch.zeros((), device=world.device)
        window_tokens = torch.zeros((), device=world.device)
        while progress.step < total_steps:
            train_batches.sampler.set_epoch(progress.epoch)
            batches = iter(train_batches)
            for _ in range(min(steps_per_epoch, total_steps - progress.step)):
                micro_batches = [next(batches) for _ in range(cfg.train.gradient_accumulation_steps)]
                loss, tokens = _train_step(model, optimizer, micro_batches, cfg, world)
                scheduler.step()
                progress.step += 1
                if progress.step == 1:  # data, model, first eval and one step: what a user waits for
                    time_to_first_step = _seconds_since(task_start, world)
                window_loss += loss
                window_tokens += tokens
                run_log.advance()
                if progress.step % cfg.train.logging_steps == 0 or progress.step == total_steps:
                    # The only host syncs of the loop: one per logging interval.
                    loss_sum, token_count = _global_sum(torch.stack([window_loss, window_tokens]))
                    progress.tokens_seen += int(token_count)
                    run_log.write({"step": progress.step, "epoch": progress.epoch,
                                   "train_loss": loss_sum / token_count, "lr": scheduler.get_last_lr()[0],
                                   "tokens_seen": progress.tokens_seen,
                                   "tokens_per_s": token_count / (time.perf_counter() - window_start)})
                    final_eval_loss = log_eval()
                    window_start = time.perf_counter()
                    window_loss.zero_()
                    window_tokens.zero_()
            progress.epoch += 1
        wall_time = time.perf_counter() - start
        run_log.close()

        final_model = output_dir / "final-model"
        save_hf_model(model, tokenizer, final_model, world)
        summary = {
            "final_model": str(final_model),
            "metrics": str(output_dir / "metrics.jsonl"),
            "initial_eval_loss": initial_eval_loss,
            "final_eval_loss": final_eval_loss,
            "steps": progress.step,
            "tokens_seen": progress.tokens_seen,
            "train_wall_time_s": wall_time,
            "time_to_first_step_s": time_to_first_step,
            "tokens_per_s": progress.tokens_seen / wall_time,
        }
        if world.is_main:
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            _print_summary(summary)
        return summary


def _train_step(model, optimizer, micro_batches: list[dict], cfg: DictConfig, world: World):
    """One optimizer step. Returns this rank's summed token loss and trained-token count (tensors).

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
    if cfg.train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, local_tokens


def _to_device(batch: dict, device: torch.device) -> dict:
    """The tensors the loss reads, copied ahead of the forward (async from pinned host memory)."""
    return {name: batch[name].to(device, non_blocking=True) for name in ("input_ids", "labels")}


def _token_loss_sum(model, batch: dict, ignore_index: int, device: torch.device) -> torch.Tensor:
    """Next-token cross-entropy summed over trained tokens (fp32 logits).

    The labels are shifted rather than the logits, so the (batch, seq, vocab) logits are never
    sliced into a copy; the upcast is a no-op unless the model computes in bf16.
    """
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    next_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=ignore_index, reduction="sum")


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


def _print_summary(summary: dict) -> None:
    print(
        f"\nhydralm: trained {summary['steps']} steps, {summary['tokens_seen']} tokens in "
        f"{summary['train_wall_time_s']:.1f} s ({summary['tokens_per_s']:.0f} tokens/s)\n"
        f"  eval loss:   {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}\n"
        f"  final model: {summary['final_model']}\n"
        f"  metrics:     {summary['metrics']}",
        flush=True,
    )
