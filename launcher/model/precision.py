"""`train.precision`: what dtype the weights, gradients and optimizer state are kept in, and what
the forward and backward compute in.

    mode      weights  grads  AdamW state   compute  bytes/param (weights+grads+state)
    fp32      fp32     fp32   fp32          fp32     16
    mixed     fp32     fp32   fp32          bf16     16 (+ bf16 copies of the gathered layers)
    bf16      bf16     bf16   bf16          bf16      8 (VectorLM's mode)
    bf16_sr   bf16     bf16   bf16          bf16      8, the update rounded stochastically

bf16 rounds every update to the nearest bf16 value, so an update smaller than half a bf16 step of
its weight (lr x update < weight x 2**-9) is lost; bf16_sr rounds up or down with probabilities
proportional to the distance, so such updates survive on average (torchao's AdamW with
`bf16_stochastic_round=True`: the step is computed in fp32, only the stored result is rounded).
`auto` is resolved where the job runs (launcher/model/device_defaults.py). Figures: docs/precision.md.
"""

import importlib.util
from typing import Optional

import torch
from omegaconf import DictConfig
from torch.distributed.fsdp import MixedPrecisionPolicy

from launcher.errors import ConfigError, choice_error

CHOICES = ("auto", "fp32", "mixed", "bf16", "bf16_sr")
BF16_WEIGHTS = ("bf16", "bf16_sr")
# The optimizers bf16_sr replaces by torchao's AdamW with the same arguments.
ADAMW_TARGETS = ("torch.optim.AdamW", "torch.optim.adamw.AdamW")


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype parameters are built, stored, checkpointed and exported in."""
    return torch.bfloat16 if precision in BF16_WEIGHTS else torch.float32


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's casts: `mixed` gathers bf16 copies of the fp32 weights and reduces gradients in
    fp32; every other mode computes in the dtype the weights are stored in."""
    if precision == "mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters (LoRA adapters included: FSDP2 needs one dtype per unit) in `dtype`. Buffers
    keep theirs: rotary frequencies stay fp32, as transformers computes them."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def torchao_adamw():
    """torchao's AdamW with bf16 stochastic rounding (public `AdamW` before torchao 0.18, `_AdamW`
    since: the same class, the optimizer torchao's own bf16 training recipe uses)."""
    import torchao.optim

    return getattr(torchao.optim, "AdamW", None) or torchao.optim._AdamW


def optimizer_override(optimizer_cfg: DictConfig, precision: str) -> Optional[dict]:
    """The class and extra arguments `precision` imposes on the configured optimizer, or None."""
    if precision != "bf16_sr":
        return None
    return {"class": torchao_adamw(), "bf16_stochastic_round": True}


def check_precision(train: DictConfig, optimizer_cfg: DictConfig) -> None:
    """Before any work: the mode exists, and bf16_sr has torchao and an AdamW to replace."""
    if train.precision not in CHOICES:
        raise choice_error("train.precision", train.precision, CHOICES)
    if train.precision != "bf16_sr":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("train.precision=bf16_sr needs the torchao package (pip install 'hydralm[torchao]'); "
                          "train.precision=bf16 needs nothing more")
    if optimizer_cfg.get("_target_") not in ADAMW_TARGETS:
        raise ConfigError(f"train.precision=bf16_sr replaces torch.optim.AdamW by torchao's AdamW with bf16 "
                          f"stochastic rounding; optimizer._target_={optimizer_cfg.get('_target_')} has no such "
                          f"variant: use optimizer=adamw, or train.precision=bf16")
    unsupported = sorted(set(optimizer_cfg) - {"_target_", "lr", "betas", "eps", "weight_decay", "amsgrad"})
    if unsupported:
        raise ConfigError(f"train.precision=bf16_sr: torchao's AdamW takes lr, betas, eps, weight_decay and amsgrad, "
                          f"not optimizer.{unsupported[0]}")
