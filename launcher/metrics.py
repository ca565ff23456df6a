"""What rank 0 shows and records while a run goes: a tqdm bar, metrics.jsonl and the loggers.

Also the derived numbers of a log row: model FLOPs per token, MFU against the device's peak, and
peak memory.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from launcher.host_memory import peak_host_memory_gib

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


class RunLog:
    """Rank 0 writes; on other ranks every method is a no-op.

    Every row goes, unchanged, to metrics.jsonl and to each logger (see launcher/loggers.py).
    """

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool, loggers=(), description: str = "train"):
        self.enabled = enabled
        self.loggers = list(loggers)
        self.file = open(output_dir / "metrics.jsonl", "a") if enabled else None
        self.bar = tqdm(total=total_steps, desc=description, unit="step", disable=not enabled, dynamic_ncols=True)

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

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            for logger in self.loggers:
                logger.close()


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
