"""Defaults that follow the machine: `auto` values resolved once, when a job starts where it runs.

Four keys take `auto` (their default) and each is overridable:

    key                 CUDA with bf16          CUDA without bf16   CPU
    train.precision     mixed                   fp32                fp32
    train.compile       true (eager fallback)   true                false
    sharding.strategy   FULL_SHARD with more than one process, else NO_SHARD (any device)
    model.attention     flex_attention for data.document_mask on CUDA (without flash_attn);
                        else flash_attention_2 where installed, else transformers' choice

and, on CUDA, torch.optim.AdamW runs its fused kernel unless `optimizer.fused` is set (one kernel
for the whole update instead of foreach's ~10% of a 1.1B step on an H200; not with cpu_offload,
whose update runs on the host, nor bf16_sr, whose AdamW is torchao's).

`resolve` is the rule (a pure function of a `Machine` and the user's choices); `apply_device_defaults`
writes its result into the config before any work (cli/app.py `run_task`), so identity, checkpoints
and the printed line all see concrete values. The figures behind the rule: docs/precision.md.
"""

import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Optional

from omegaconf import DictConfig, open_dict

log = logging.getLogger("hydralm")

AUTO = "auto"
PRECISIONS = ("fp32", "mixed", "bf16", "bf16_sr")


@dataclass(frozen=True)
class Machine:
    """What the rule needs to know of where the job runs."""
    device: str  # "cuda" | "cpu"
    bf16: bool  # the device computes in bf16 natively (CUDA capability >= 8.0)
    world_size: int
    flash_attn: bool = False  # the flash_attn package is importable


@dataclass(frozen=True)
class Choices:
    """The four keys as the user left them (`auto`) or set them."""
    precision: str
    compile: Any  # "auto" | True | False
    strategy: str
    attention: str
    document_mask: bool = False


def resolve(choices: Choices, machine: Machine) -> Choices:
    """The rule: every `auto` replaced by the machine's default; explicit values untouched."""
    cuda = machine.device == "cuda"
    resolved = choices
    if choices.precision == AUTO:
        resolved = replace(resolved, precision="mixed" if cuda and machine.bf16 else "fp32")
    if choices.compile == AUTO:
        resolved = replace(resolved, compile=cuda)
    if str(choices.strategy).upper() == AUTO.upper():
        resolved = replace(resolved, strategy="FULL_SHARD" if machine.world_size > 1 else "NO_SHARD")
    if choices.attention == AUTO and cuda and choices.document_mask and not machine.flash_attn:
        resolved = replace(resolved, attention="flex_attention")
    return resolved


def this_machine() -> Machine:
    import torch

    from launcher.distributed import launch_world_size

    cuda = torch.cuda.is_available()
    return Machine(device="cuda" if cuda else "cpu", bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
                   world_size=launch_world_size(), flash_attn=importlib.util.find_spec("flash_attn") is not None)


def choices_of(cfg: DictConfig) -> Choices:
    return Choices(precision=cfg.train.precision, compile=cfg.train.compile, strategy=cfg.sharding.strategy,
                   attention=cfg.model.attention, document_mask=bool(cfg.data.get("document_mask", False)))


def apply_device_defaults(cfg: DictConfig, machine: Optional[Machine] = None) -> Optional[str]:
    """Write the resolved values into `cfg`; the line describing them, or None when nothing was
    `auto` (a second call changes nothing). train.compile=auto on CUDA is tried on a tiny function
    first: a machine where torch.compile cannot work trains eagerly, with a one-line warning."""
    before = choices_of(cfg)
    if AUTO not in (before.precision, str(before.compile), str(before.strategy).lower(), before.attention):
        return None
    machine = machine or this_machine()
    after = resolve(before, machine)
    fused = fuses_adamw(cfg, machine, after.precision)
    if before.compile == AUTO and after.compile:
        failure = compile_failure(machine)
        if failure is not None:
            log.warning("hydralm: warning: train.compile=auto: torch.compile fails on this machine (%s); "
                        "training eagerly (train.compile=false silences this)", failure)
            after = replace(after, compile=False)
    with open_dict(cfg):
        if fused:
            cfg.optimizer.fused = True
        cfg.train.precision, cfg.train.compile = after.precision, after.compile
        cfg.sharding.strategy, cfg.model.attention = after.strategy, after.attention
        if cfg.sharding.backend == AUTO and cfg.sharding.cpu_offload and machine.device == "cuda":
            from launcher.distributed import CPU_AND_CUDA

            cfg.sharding.backend = CPU_AND_CUDA  # the offloaded gradient norm is all-reduced on the host

    def shown(key: str, old, new) -> str:
        return f"{key}={str(new).lower() if isinstance(new, bool) else new}" + (" (auto)" if old == AUTO else "")

    processes = f", {machine.world_size} processes" if machine.world_size > 1 else ""
    return (f"hydralm: on {machine.device}{' (bf16)' if machine.bf16 else ''}{processes}: "
            f"{shown('precision', before.precision, after.precision)}, {shown('compile', before.compile, after.compile)}, "
            f"{shown('sharding', str(before.strategy).lower(), after.strategy)}, "
            f"{shown('attention', before.attention, after.attention)}" + (", optimizer=fused AdamW (auto)" if fused else ""))


def fuses_adamw(cfg: DictConfig, machine: Machine, precision: str) -> bool:
    """torch.optim.AdamW gets `fused=True` on CUDA when the user left `optimizer.fused` unset."""
    return (machine.device == "cuda" and cfg.optimizer.get("_target_") == "torch.optim.AdamW"
            and cfg.optimizer.get("fused") is None and not cfg.sharding.cpu_offload and precision != "bf16_sr")


def compile_failure(machine: Machine) -> Optional[str]:
    """Why torch.compile cannot run on this machine's device (no triton, no compiler), or None."""
    import torch

    device = torch.device(machine.device, int(os.environ.get("LOCAL_RANK", 0)) if machine.device == "cuda" else None)
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001 (any failure means: train eagerly)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return None
