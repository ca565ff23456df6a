"""What a run measures and records: metric sums kept on the device between log points (Window),
the rows rank 0 shows and writes (a tqdm bar, metrics.jsonl and the loggers), and the derived
numbers of a row: model FLOPs per token, MFU against the device's peak, and peak memory.
"""

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from launcher.job_log import record_in_job_log
from launcher.store.atomic import open_own_file
from launcher.store.run_dir import METRICS
from launcher.training.host_memory import peak_host_memory_gib

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, matched as substrings of
# torch.cuda.get_device_name(), most specific first. `train.peak_flops_per_device` overrides.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A40", 150e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
)


class Window:
    """Named sums since the last log point, on this rank and on the device: adding a step's
    values never waits for the device; `global_sums` (one all-reduce, one host read) does."""

    def __init__(self, names, device: torch.device):
        self.names = list(names)
        self.values = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, **values: torch.Tensor) -> None:
        # one device for all: a value computed elsewhere (the host, under cpu_offload) is copied here
        self.values += torch.stack([values[name].detach().to(self.values.device, torch.float64) for name in self.names])

    def global_sums(self) -> dict[str, float]:
        """Sums over all ranks, read on the host."""
        values = self.values
        if dist.is_initialized() and dist.get_world_size() > 1:
            values = values.clone()
            dist.all_reduce(values)
        return dict(zip(self.names, values.tolist()))

    def reset(self) -> None:
        self.values.zero_()

    def state_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values.tolist()))

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.reset()
        self.add_state_dict(state)

    def add_state_dict(self, state: dict[str, float]) -> None:
        extra = torch.tensor([state.get(name, 0.0) for name in self.names], dtype=torch.float64)
        self.values += extra.to(self.values.device)


class Throughput:
    """tokens/s (input tokens, padding excluded), per device, MFU (when the device's peak FLOP/s
    is known) and peak memory, for a train row."""

    def __init__(self, model, trainable: int, total: int, seq_len: int, world, peak_flops: Optional[float]):
        embedding = model.get_input_embeddings().weight.numel()
        self.flops_per_token = flops_per_token(model.config, total, trainable, embedding, seq_len)
        self.peak_flops = peak_flops_per_device(world.device, peak_flops)
        self.world = world

    def row(self, tokens: float, seconds: float) -> dict:
        per_device = tokens / seconds / self.world.size
        row = {"tokens_per_s": tokens / seconds, "tokens_per_s_per_device": per_device}
        if self.peak_flops:
            row["mfu"] = per_device * self.flops_per_token / self.peak_flops
        row["peak_mem_gib"] = peak_memory_gib(self.world.device)
        return row


def _open_metrics(path: Path, append: bool):
    """metrics.jsonl for appending rows (or fresh), never through a symlink (launcher/store/atomic.py)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(open_own_file(path, flags), "a" if append else "w")


class RunLog:
    """Rank 0 writes; on other ranks every method is a no-op.

    Every row goes, unchanged, to metrics.jsonl and to each logger (see launcher/training/loggers.py).
    A resumed run appends to the rows kept for its checkpoint (launcher/training/checkpoint.py) and its bar
    starts at the resumed step; a run from step 0 replaces the rows of any attempt killed before
    its first checkpoint.
    """

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool, loggers=(), description: str = "train",
                 start_step: int = 0, append: bool = False):
        self.enabled = enabled
        self.loggers = list(loggers)
        self.total_steps = total_steps
        self.file = _open_metrics(output_dir / METRICS, append) if enabled else None
        # A bar redrawn with \r is one unreadable line in a SLURM log or a pipe: there, each row
        # is a plain log line instead (hydralm.log keeps the lines in both cases).
        self.plain = not interactive_console()
        self.bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step",
                        disable=not enabled or self.plain, dynamic_ncols=True)

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for logger in self.loggers:
            logger.log(row)
        shown = {k: row[k] for k in ("train_loss", "eval_loss", "lr", "tokens_per_s") if k in row}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=True)
        line = progress_line(row, self.total_steps)
        if self.plain:
            print(line, flush=True)
        record_in_job_log(logging.INFO, line)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            for logger in self.loggers:
                logger.close()


def interactive_console() -> bool:
    """A terminal a person watches: stderr is a TTY and this is not a SLURM job (whose output
    goes to a file even when srun gives it a pseudo-terminal)."""
    return sys.stderr.isatty() and "SLURM_JOB_ID" not in os.environ


def progress_line(row: dict, total_steps: int) -> str:
    """`step 10/40: train loss 6.8123, lr 0.0003, 5210 tokens/s` (a train row) or
    `step 10/40: eval loss 6.9010` (an eval row)."""
    if "train_loss" in row:
        values = f"train loss {row['train_loss']:.4f}, lr {row['lr']:.3g}, {row['tokens_per_s']:.0f} tokens/s"
    else:
        values = f"eval loss {row['eval_loss']:.4f}"
    return f"step {row['step']}/{total_steps}: {values}"


def flops_per_token(model_config, total_params: int, trainable_params: int, embedding_params: int,
                    seq_len: int) -> float:
    """Model FLOPs of one trained token, forward and backward.

    2 per weight forward, 2 backward for the activation gradients, 2 more for each weight that
    trains (6 x params for full fine-tuning, ~4 x params for LoRA), over the matmul weights (the
    input embedding is a lookup), plus the attention scores: 12 x layers x hidden x seq_len
    (PaLM, appendix B; causal masking not discounted).
    """
    matmul_params = total_params - embedding_params
    trainable_matmul = min(trainable_params, matmul_params)
    attention = 12 * model_config.num_hidden_layers * model_config.hidden_size * seq_len
    return 4 * matmul_params + 2 * trainable_matmul + attention


def peak_flops_per_device(device: torch.device, configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory tensors ever held on the device. CPU: the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_memory_gib()
