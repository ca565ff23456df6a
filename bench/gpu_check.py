"""The GPU checklist: hydralm's correctness, packed documents and throughput on one CUDA GPU, in
one command that writes every figure to one JSON file and prints a table.

    python bench/gpu_check.py                  # one CUDA GPU, the default set within --budget-s (420)
    python bench/gpu_check.py --only throughput_1b_default,peer_bare_fsdp2
    python bench/gpu_check.py --list           # the items, in the order they run, with estimated seconds
    python bench/gpu_check.py --smoke          # CPU, tiny shapes, gloo: every item's code path in ~3 minutes
    bash bench/gpu_run.sh 420                  # the same on a lent device machine (docs/gpu.md)

Items run most valuable first, each in its own process (forked from a server that imported torch
and transformers once, so an item costs no interpreter start) under its own timeout. A failed
check, an exception, an out-of-memory error or a timeout is recorded with the last lines of the
item's output and the next item starts; the JSON is rewritten after every item. Nothing is
downloaded: models are random-init Llamas of the named shapes, data is the embedded corpus or
random tokens.

Throughput: hydralm's own model build, FSDP2 wrapping and optimizer step (`launcher.training.trainer`) on
random tokens with each item's overrides (OVERRIDES below: none for the default-flags item), warm-up
steps (compilation happens there), then timed steps. The peers (bench/gpu_peers.py) train the same
shape and batch without hydralm, each in its own item, and the `ratio` lines compare tokens/s.
`mfu` uses hydralm's FLOPs per token (6N plus attention, as in metrics.jsonl); `mfu_6n` is
6 x parameters x tokens/s over the peak.
"""

import argparse
import copy
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, compose, publish, subprocess_env

SCHEMA = "hydralm-gpu-check/1"
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_BUDGET_S = 420  # the default set stays under 8 minutes of a lent GPU, setup included
MIN_START_S = 20  # an item is not started with less budget left than this

# Random-init Llama shapes (no download). 1b: TinyLlama-1.1B. 8b: Llama-3-8B.
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128},
}
# Training runs of the tiny default model on the embedded corpus (the correctness items).
RUN_STEPS = ["train.max_steps=20", "train.logging_steps=1", "train.max_eval_batches=1", "data.eval_bs=8"]
SMOKE_RUN_STEPS = ["train.max_steps=4", "train.logging_steps=1", "train.max_eval_batches=1", "data.eval_bs=2",
                   "train.max_seq_len=64", "data.train_bs=2", *(f"model.config.{k}={v}" for k, v in (
                       ("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 2),
                       ("num_attention_heads", 2), ("num_key_value_heads", 2)))]

# --- what each item sets: data, so the lead renames keys here when the schema changes -------------
FP32 = ["train.precision=fp32", "train.compile=false"]  # the reference runs: fp32 weights and compute
MP = ["sharding=full_shard", "train.precision=mixed", "train.compile=false"]  # fp32 master weights, bf16 compute
FUSED = "+optimizer.fused=true"  # torch's fused AdamW (not for bf16_sr: that mode brings its own AdamW)
COMPILED = "train.compile=true"
LEAN = ["train.use_activation_checkpointing=true", "train.loss=chunked_cross_entropy"]
MIXED_1B = ["sharding=full_shard", "train.precision=mixed", "model.attention=sdpa", FUSED]
# Throughput items: these on top of the shape (model.config.*), train.max_seq_len, the backend,
# train.max_grad_norm=1.0 and optimizer=adamw. Correctness items: on top of the tiny default.
OVERRIDES = {
    "throughput_1b_default": [],  # no flags: train.precision=auto, train.compile=auto, sharding=auto
    "throughput_1b_sdpa": [*MIXED_1B, "train.compile=false"],  # the explicit eager figure
    "cpu_offload": [*MP, "sharding.cpu_offload=true"],
    "throughput_8b_bf16": ["sharding=full_shard", "train.precision=bf16", COMPILED, *LEAN, FUSED],
    "throughput_8b_bf16_sr": ["sharding=full_shard", "train.precision=bf16_sr", COMPILED, *LEAN],
    "throughput_1b_flex_document_mask": ["model.attention=flex_attention"],  # the default flags, packed rows
    "activation_checkpointing": [*MP, "train.use_activation_checkpointing=true"],
    "compile": [*MP[:-1], COMPILED],
    "throughput_1b_sdpa_compile": [*MIXED_1B, COMPILED],
    "throughput_1b_sdpa_compile_chunked_loss": [*MIXED_1B, COMPILED, "train.loss=chunked_cross_entropy"],
    "throughput_1b_sdpa_chunked_loss": [*MIXED_1B, "train.compile=false", "train.loss=chunked_cross_entropy"],
    "throughput_1b_sdpa_ac": [*MIXED_1B, "train.compile=false", "train.use_activation_checkpointing=true"],
    "throughput_1b_sdpa_compile_ac_chunked_loss_batch16": [*MIXED_1B, COMPILED, *LEAN],
    "throughput_1b_sdpa_document_mask": [*MIXED_1B, "train.compile=false"],
    "throughput_8b_ac_chunked_loss": [*MP, *LEAN, FUSED],
    "throughput_1b_flash": [*MP, "model.attention=flash_attention_2", FUSED],
    "throughput_1b_flash_document_mask": [*MP, "model.attention=flash_attention_2", FUSED],
    "throughput_8b_cpu_offload": [*MP, *LEAN, "sharding.cpu_offload=true"],
}
# Bytes a parameter takes for weights, gradients and AdamW state, by train.precision (for the
# memory check before a big model is built): fp32 master weights 4+4+8; pure bf16 2+2+4 (torchao's
# bf16 AdamW with stochastic rounding keeps its state in bf16 too).
STATE_BYTES = {"fp32": 16, "mixed": 16, "auto": 16, "bf16": 8, "bf16_sr": 8}
BF16_RTOL = 2e-2  # bf16 compute against fp32, per logged train loss
FP32_RTOL = 1e-4  # fp32 against fp32 (other wrapping, same GPU)
PACKED_RTOL = 1e-3  # packed documents against the same documents one by one
SMOKE_COMPILE_BACKEND = "aot_eager"  # see _compile_without_inductor
RELOAD_RTOL = 1e-3  # the exported model's eval loss against the run's last one
WEIGHTS_RTOL = 1e-2  # a resumed run's final weights against the uninterrupted run's, per tensor (Frobenius)


# --- items ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    name: str
    group: str  # environment | throughput | correctness | packed
    run: Callable[[dict], dict]
    timeout_s: float  # on a GPU; the remaining budget caps it
    estimate_s: float  # expected seconds on one H200
    what: str
    args: dict = field(default_factory=dict)
    needs_cuda: Optional[str] = None  # why it cannot run on CPU (skipped by --smoke)
    default: bool = True  # in the set that runs without --only


def environment(spec: dict) -> dict:
    """Versions, the GPU, and a bf16 matmul against fp32 (tensor cores give sane numbers)."""
    import torch
    import transformers

    from launcher.training.metrics import peak_flops_per_device

    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
               "host_memory_gib": _host_memory_gib(), "hostname": socket.gethostname(), "gpu": None,
               **{package: _version(package) for package in ("flash_attn", "liger_kernel", "triton")}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        figures.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                       gpu_memory_gib=props.total_memory / 2**30, compute_capability=f"{props.major}.{props.minor}",
                       cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                       peak_bf16_flops=peak_flops_per_device(device, spec.get("peak_flops")))
    a, b = torch.randn(2, 1024, 1024, device=device).unbind()
    exact = a @ b
    error = ((a.bfloat16() @ b.bfloat16()).float() - exact).norm() / exact.norm()
    figures["bf16_matmul_rel_error"] = error.item()
    return {"figures": figures, "passed": error.item() < 1e-2, "criterion": "bf16 matmul within 1e-2 of fp32"}


def throughput(spec: dict) -> dict:
    """Timed optimizer steps of hydralm's train step; see the module doc."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
    import torch

    from launcher.distributed import distributed, seed_everything
    from launcher.model.modeling import load_tokenizer
    from launcher.training.metrics import flops_per_token, peak_flops_per_device, peak_memory_gib
    from launcher.training.trainer import build_training_model

    cfg = compose(_throughput_overrides(spec))
    with _torchrun_environment(), distributed(cfg.sharding.backend) as world:
        skip = _attention_unavailable(cfg.model.attention, world.device) or _memory_shortfall(cfg, world, spec)
        if skip:
            return {"skipped": skip}
        seed_everything(cfg.train.seed)
        with world.device:  # initialise the weights where they will live first
            model = build_training_model(cfg, load_tokenizer(cfg.model), world)  # the trainer's build
        params = sum(p.numel() for p in model.parameters())  # global counts, also of sharded DTensors
        embedding = model.get_input_embeddings().weight.numel()
        optimizer = _optimizer(model, cfg)
        step = _optimizer_step(cfg, world)
        batches = _random_batches(spec, cfg.model.config.vocab_size, pin=world.device.type == "cuda")
        for batch in batches[:spec["warmup"]]:  # compilation happens here
            step(model, optimizer, batch)
        _synchronize(world.device)
        with _profiler(world.device) if spec.get("profile") else nullcontext() as profile:
            start = time.perf_counter()
            for batch in batches[spec["warmup"]:]:
                loss, tokens = step(model, optimizer, batch)
            _synchronize(world.device)
            seconds = time.perf_counter() - start
        last_loss = (loss / tokens).item()
        memory = peak_memory_gib(world.device)
        peak = peak_flops_per_device(world.device, spec.get("peak_flops"))
    tokens_per_s = spec["steps"] * spec["batch"] * spec["seq_len"] / seconds
    per_token = flops_per_token(model.config, params, params, embedding, spec["seq_len"])
    figures = {"params": params, "batch": spec["batch"], "seq_len": spec["seq_len"], "timed_steps": spec["steps"],
               "tokens_per_s": tokens_per_s, "step_s": seconds / spec["steps"], "flops_per_token": per_token,
               "mfu": tokens_per_s * per_token / peak if peak else None,
               "mfu_6n": 6 * params * tokens_per_s / peak if peak else None,
               "peak_memory_gib": memory, "last_loss": last_loss, "overrides": _throughput_overrides(spec),
               "resolved": _resolved(cfg), "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}"}
    if profile:
        figures.update(profiled_item=spec["profiled_item"], profile=_profile_summary(profile, seconds, spec))
    return {"figures": figures, "passed": math.isfinite(last_loss), "criterion": "finite loss"}


def peer(spec: dict) -> dict:
    """One of bench/gpu_peers.py's loops on the item's shape and batch (no hydralm training code)."""
    from bench import gpu_peers

    spec = {**spec, "shape_config": _shape(spec)}
    if spec["peer"] == "hf_trainer":
        return gpu_peers.hf_trainer(spec)
    with _torchrun_environment():  # a process group of one, as torchrun starts it
        return gpu_peers.bare_fsdp2(spec, compile_layers=spec["peer"] == "bare_fsdp2_compile")


def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


PROFILE_TOP = 15


def _profile_summary(profile, wall_s: float, spec: dict) -> dict:
    """The top kernels by device time (CPU: ops by self CPU time) and the share of the profiled
    wall time the GPU spent in kernels; also written as a text table beside the JSON."""
    from torch.autograd import DeviceType

    # The device's own events (kernels, copies): a CPU op's "self device time" repeats its kernels'.
    kernels = [event for event in profile.key_averages()
               if event.device_type != DeviceType.CPU and not getattr(event, "is_user_annotation", False)]
    on_gpu = bool(kernels)
    time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    events = sorted(kernels or profile.key_averages(), key=time_of, reverse=True)
    busy_us = sum(time_of(event) for event in events)
    summary = {
        "clock": "device (CUDA kernels)" if on_gpu else "CPU (self time of each op)",
        "wall_s": wall_s, "steps": spec["steps"],
        "gpu_busy_share_of_wall": busy_us / 1e6 / wall_s if on_gpu else None,
        "top": [{"name": event.key[:160], "calls": event.count, "ms": time_of(event) / 1e3,
                 "share": time_of(event) / busy_us if busy_us else None} for event in events[:PROFILE_TOP]],
    }
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    busy = summary["gpu_busy_share_of_wall"]
    header = (f"profile of {spec['profiled_item']} ({spec['steps']} steps, {wall_s:.2f} s wall; GPU busy "
              f"{'n/a' if busy is None else f'{busy:.1%}'} of wall = kernel time summed / wall)\n")
    table = profile.key_averages().table(sort_by=sort_by, row_limit=PROFILE_TOP, max_name_column_width=80)
    Path(spec["profile_path"]).write_text(header + table + "\n")
    summary["text"] = spec["profile_path"]
    return summary


def mixed_precision(spec: dict) -> dict:
    """fp32 full_shard and bf16 (train.precision=mixed) full_shard against the fp32 plain module, all with
    the GPU backend (nccl), a process group of one: the reference as `python -m launcher` starts
    it (in-process store), the others as torchrun does (env:// rendezvous, device_id)."""
    reference = _train_run(spec, "fp32", FP32, torchrun=False)
    fp32_sharded = _train_run(spec, "fp32_full_shard", ["sharding=full_shard", *FP32])
    bf16 = _train_run(spec, "bf16_full_shard", MP)
    fp32_rel, bf16_rel = _loss_rel(fp32_sharded, reference), _loss_rel(bf16, reference)
    return {"figures": {"backend": spec["backend"], "steps": len(_train_losses(reference)),
                        "fp32_full_shard_max_rel": fp32_rel, "bf16_full_shard_max_rel": bf16_rel,
                        "fp32_losses": _train_losses(reference), "bf16_losses": _train_losses(bf16)},
            "passed": fp32_rel <= FP32_RTOL and bf16_rel <= BF16_RTOL,
            "criterion": f"train loss at every step: fp32 full_shard rel <= {FP32_RTOL:g}, "
                         f"bf16 (mixed) rel <= {BF16_RTOL:g} of the fp32 plain module"}


def bf16_variant(spec: dict) -> dict:
    """The item's run (OVERRIDES: bf16 compute plus one feature) against fp32 and against plain bf16."""
    run = _train_run(spec, spec["item"], spec["overrides"])
    vs_fp32 = _loss_rel(run, _train_run(spec, "fp32", FP32, torchrun=False))
    vs_bf16 = _loss_rel(run, _train_run(spec, "bf16_full_shard", MP))
    return {"figures": {"max_rel_vs_fp32": vs_fp32, "max_rel_vs_bf16_full_shard": vs_bf16,
                        "losses": _train_losses(run)},
            "passed": vs_fp32 <= BF16_RTOL, "criterion": f"train loss at every step within rel {BF16_RTOL:g} of fp32"}


def resume_after_kill(spec: dict) -> dict:
    """`python -m launcher` (bf16, full_shard, a checkpoint every 5 steps, torchrun's environment)
    is SIGKILLed inside the save of step 10 (the checkpoint's shards written, its marker not); the
    same config again resumes from step 5 and must end as the uninterrupted run did."""
    from launcher.store.run_dir import checkpoint_dir, latest_checkpoint

    every = spec["run_steps"] // 4
    overrides = [*MP, "train.checkpointing_enabled=true", f"train.save_steps={every}"]
    out = Path(spec["work"]) / "resumed"
    shutil.rmtree(out, ignore_errors=True)
    # tests/kill_in_save.py: `python -m launcher` that SIGKILLs itself inside that step's save
    command = [sys.executable, str(ROOT / "tests" / "kill_in_save.py"), str(2 * every),
               *_run_overrides(spec, overrides, out)]
    with _torchrun_environment():
        killed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=spec["timeout_s"],
                                env=subprocess_env())
    if killed.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run was to be killed at step {2 * every}, it ended with {killed.returncode}:\n"
                           + killed.stderr[-2000:])
    resumed_from = latest_checkpoint(out)  # the step-10 checkpoint has no marker: step 5
    _run_task(_run_overrides(spec, overrides, out), torchrun=True)
    uninterrupted = _train_run(spec, "bf16_full_shard", MP)
    loss_rel = _loss_rel(out, uninterrupted)
    weights_rel = _weights_rel(out, uninterrupted)
    resumed_from = resumed_from.name if resumed_from else None
    return {"figures": {"killed_at_step": 2 * every, "resumed_from": resumed_from,
                        "loss_max_rel": loss_rel, "weights_max_rel": weights_rel},
            "passed": resumed_from == checkpoint_dir(out, every).name and loss_rel <= BF16_RTOL and weights_rel <= WEIGHTS_RTOL,
            "criterion": f"resumed from step {every}; train loss rel <= {BF16_RTOL:g} and final weights "
                         f"||a-b||/||b|| <= {WEIGHTS_RTOL:g} per tensor against the uninterrupted run"}


def final_model_reload(spec: dict) -> dict:
    """task=evaluate on the bf16 run's final-model/ gives the eval loss the run ended with."""
    run = _train_run(spec, "bf16_full_shard", MP)
    trained = json.loads((run / "summary.json").read_text())["final_eval_loss"]
    result = _run_task(_run_overrides(spec, [*MP, "task=evaluate", f"checkpoint={run / 'final-model'}"],
                                      Path(spec["work"]) / "evaluate"), torchrun=True)
    rel = abs(result["eval_loss"] - trained) / trained
    return {"figures": {"trained_final_eval_loss": trained, "reloaded_eval_loss": result["eval_loss"], "rel": rel},
            "passed": rel <= RELOAD_RTOL, "criterion": f"eval loss of the reloaded model within rel {RELOAD_RTOL:g}"}


def document_mask_equality(spec: dict) -> dict:
    """A packed batch (several documents per row, per-document position_ids) has the loss of its
    documents run one by one (each alone, eager attention), for each attention and dtype."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures, skipped = {}, {}
    for attention in spec["attentions"]:
        reason = _attention_unavailable(attention, device)
        if reason:
            skipped[attention] = reason
            continue
        for dtype in ("float32", "bfloat16"):
            figures[f"{attention}_{dtype}_rel"] = _packed_vs_separate(attention, getattr(torch, dtype), device, spec)
    passed = bool(figures) and all(rel <= PACKED_RTOL for rel in figures.values())
    return {"figures": {**figures, "skipped": skipped}, "passed": passed,
            "criterion": f"packed loss within rel {PACKED_RTOL:g} of the documents one by one"}


# Most valuable first: the setup, what a user gets with no flags against its peers, the crash of
# the last run, the 8B lean modes, packed documents, then the rest. estimate_s: seconds on one H200,
# from the first run's figures (bench/results/gpu_check-nvidia-h200-2026-12-04.json) where the item
# ran there; --budget-s skips an item whose estimate no longer fits. default=False: only with --only
# or --all (measured before, or needs what the device lacks).
ITEMS = [
    Item("environment", "environment", environment, 90, 14, "versions, GPU, bf16 matmul sanity"),
    Item("throughput_1b_default", "throughput", throughput, 300, 20,
         "1.1B Llama, no flags: what `python -m launcher` picks on this device", {"shape": "1b"}),
    Item("peer_bare_fsdp2", "peer", peer, 150, 20, "peer: plain PyTorch FSDP2 loop, bf16 compute, fused AdamW",
         {"shape": "1b", "peer": "bare_fsdp2"}),
    Item("peer_bare_fsdp2_compile", "peer", peer, 300, 30, "peer: the same + torch.compile per decoder layer",
         {"shape": "1b", "peer": "bare_fsdp2_compile"}),
    Item("peer_hf_trainer", "peer", peer, 200, 25, "peer: transformers.Trainer, bf16, adamw_torch_fused",
         {"shape": "1b", "peer": "hf_trainer"}),
    Item("throughput_1b_sdpa", "throughput", throughput, 150, 9, "1.1B, bf16 compute + fp32 master, sdpa, eager",
         {"shape": "1b"}),
    Item("cpu_offload", "correctness", bf16_variant, 150, 15, "bf16 + sharding.cpu_offload vs fp32 (crashed in run 1)",
         needs_cuda="sharding.cpu_offload moves GPU memory to the host"),
    Item("throughput_8b_bf16", "throughput", throughput, 300, 40,
         "Llama-3-8B shape, pure bf16, batch 4, compile + activation checkpointing + chunked loss",
         {"shape": "8b", "batch": 4, "warmup": 2, "steps": 3}),
    Item("throughput_8b_bf16_sr", "throughput", throughput, 300, 50,  # + torchao's AdamW compiling its step
         "Llama-3-8B shape, bf16 + stochastic-rounding AdamW (torchao), batch 4, compile + AC + chunked loss",
         {"shape": "8b", "batch": 4, "warmup": 2, "steps": 3}),
    Item("throughput_1b_flex_document_mask", "packed", throughput, 300, 36,
         "1.1B, packed documents, flex_attention, otherwise no flags (ratio packed/unpacked)",
         {"shape": "1b", "document_mask": True}, needs_cuda="torch has no FlexAttention backward on CPU"),
    Item("profile", "profile", throughput, 240, 25,
         "torch.profiler over 3 steps of the fastest 1.1B hydralm item: top kernels, GPU busy share",
         {"shape": "1b", "steps": 3, "profile": True}),
    Item("mixed_precision", "correctness", mixed_precision, 180, 9,
         "tiny model 20 steps: fp32 full_shard and bf16 (mixed) full_shard vs fp32, NCCL group of one"),
    Item("resume_after_kill", "correctness", resume_after_kill, 180, 22, "kill -9 inside a save, resume, compare"),
    Item("final_model_reload", "correctness", final_model_reload, 120, 3, "task=evaluate on final-model/"),
    Item("activation_checkpointing", "correctness", bf16_variant, 150, 6, "bf16 + activation checkpointing vs fp32"),
    Item("document_mask_equality", "packed", document_mask_equality, 180, 22,
         "packed documents vs one by one: sdpa, flex_attention, flash_attention_2 (if installed)",
         {"attentions": ["sdpa", "flex_attention", "flash_attention_2"]}),
    Item("compile", "correctness", bf16_variant, 240, 16, "bf16 + train.compile vs fp32"),
    Item("throughput_1b_sdpa_compile", "throughput", throughput, 300, 18, "1.1B, bf16 compute + fp32 master, compile",
         {"shape": "1b"}),
    Item("throughput_1b_sdpa_compile_ac_chunked_loss_batch16", "throughput", throughput, 300, 21,
         "+ compile + activation checkpointing + chunked loss, twice the batch",
         {"shape": "1b", "batch_factor": 2}),
    Item("throughput_8b_ac_chunked_loss", "throughput", throughput, 240, 7,
         "Llama-3-8B shape, fp32 master weights, batch 1, AC + chunked loss (run 1's 8B figure)",
         {"shape": "8b", "batch": 1, "warmup": 2, "steps": 3}),
    Item("throughput_1b_sdpa_chunked_loss", "throughput", throughput, 150, 10, "+ train.loss=chunked_cross_entropy",
         {"shape": "1b"}, default=False),
    Item("throughput_1b_sdpa_ac", "throughput", throughput, 150, 8, "+ activation checkpointing", {"shape": "1b"},
         default=False),
    Item("throughput_1b_sdpa_compile_chunked_loss", "throughput", throughput, 240, 10, "+ compile + chunked loss",
         {"shape": "1b"}, default=False),
    Item("throughput_1b_sdpa_document_mask", "packed", throughput, 150, 9, "1.1B, packed documents, sdpa, eager",
         {"shape": "1b", "document_mask": True}, default=False),
    Item("throughput_1b_flash", "throughput", throughput, 150, 10, "1.1B, flash_attention_2 (if installed)",
         {"shape": "1b"}, needs_cuda="flash_attention_2 runs on CUDA only", default=False),
    Item("throughput_1b_flash_document_mask", "packed", throughput, 150, 10,
         "1.1B, packed documents, flash_attention_2 varlen (if installed)",
         {"shape": "1b", "document_mask": True}, needs_cuda="flash_attention_2 runs on CUDA only", default=False),
    Item("throughput_8b_cpu_offload", "throughput", throughput, 300, 60,
         "Llama-3-8B shape, batch 1, cpu_offload + activation checkpointing + chunked loss (host RAM permitting)",
         {"shape": "8b", "batch": 1, "warmup": 1, "steps": 2},
         needs_cuda="sharding.cpu_offload moves GPU memory to the host", default=False),
]
ITEMS_BY_NAME = {item.name: item for item in ITEMS}
# What `profile` picks from: hydralm's unpacked 1.1B items (the fastest one that passed in this run).
PROFILE_CANDIDATES = ["throughput_1b_default", "throughput_1b_sdpa_compile", "throughput_1b_sdpa",
                      "throughput_1b_sdpa_compile_chunked_loss", "throughput_1b_sdpa_chunked_loss"]
# ratio <name>: tokens/s of the first item over the second's (printed last, and in the JSON).
RATIOS = {
    "hydralm/bare": ("throughput_1b_default", "peer_bare_fsdp2"),
    "hydralm/bare-compiled": ("throughput_1b_default", "peer_bare_fsdp2_compile"),
    "hydralm/trainer": ("throughput_1b_default", "peer_hf_trainer"),
    "hydralm-eager/bare": ("throughput_1b_sdpa", "peer_bare_fsdp2"),
    "packed/unpacked": ("throughput_1b_flex_document_mask", "throughput_1b_default"),
}
# Issue 19's targets: (what, item or ratio, figure, at least).
TARGETS = [
    ("1.1B, no flags: MFU", "throughput_1b_default", "mfu", 0.50),
    ("hydralm / compiled plain FSDP2", "hydralm/bare-compiled", "ratio", 1.2),
    ("hydralm / transformers.Trainer", "hydralm/trainer", "ratio", 1.4),
    ("8B pure bf16, batch 4: MFU", "throughput_8b_bf16", "mfu", 0.35),
    ("8B bf16 + stochastic rounding, batch 4: MFU", "throughput_8b_bf16_sr", "mfu", 0.35),
    ("packed / unpacked tokens/s", "packed/unpacked", "ratio", 0.95),
]


# --- helpers that run inside an item's process ------------------------------------------------------

def _throughput_overrides(spec: dict) -> list[str]:
    return [
        *(f"model.config.{key}={value}" for key, value in _shape(spec).items()),
        f"train.max_seq_len={spec['seq_len']}", f"sharding.backend={spec['backend']}", "train.max_grad_norm=1.0",
        "optimizer=adamw", *spec["overrides"],
    ]


def _shape(spec: dict) -> dict:
    return SHAPES["smoke" if spec["smoke"] else spec["shape"]]


def _optimizer(model, cfg):
    """The trainer's optimizer: its parameter groups, its precision variant."""
    from launcher.training.optim import build_optimizer, parameter_groups

    groups = parameter_groups(model, cfg.optimizer, cfg.train.decay_norms_and_biases)
    return build_optimizer(groups, cfg.optimizer, cfg.train.precision)


def _resolved(cfg) -> dict:
    """What the run trained with once every `auto` was resolved on this machine (the trainer's build
    resolves them in place), for the default-flags item above all."""
    from omegaconf import OmegaConf

    keys = ("train.precision", "train.compile", "sharding.strategy", "model.attention")
    values = {key: OmegaConf.select(cfg, key, default=None) for key in keys}
    return {key: value for key, value in values.items() if value is not None}


def _optimizer_step(cfg, world):
    """hydralm's optimizer step over one micro-batch; returns (summed loss, trained tokens). The one
    place this file reaches into the training loop."""
    from launcher.training.trainer import optimizer_step
    from tasks.train import LanguageModeling

    task = LanguageModeling(cfg)

    def step(model, optimizer, batch):
        result = optimizer_step(model, optimizer, [batch], task, world)
        return result.loss, result.weight

    return step


def _random_batches(spec: dict, vocab: int, pin: bool) -> list[dict]:
    """Random tokens; with `document_mask`, rows packed from documents of random lengths (mean a
    quarter row) with per-document position_ids, the first token of each document not a target."""
    import torch

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(vocab, (spec["batch"], spec["seq_len"]), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone(), "input_tokens": torch.tensor(ids.numel())}
        if spec.get("document_mask"):
            positions = torch.stack([_document_positions(spec["seq_len"], generator) for _ in range(spec["batch"])])
            batch["position_ids"] = positions
            batch["labels"][positions == 0] = -100
        batches.append({k: v.pin_memory() if pin else v for k, v in batch.items()})
    return batches


def _document_positions(seq_len: int, generator) -> "torch.Tensor":
    import torch

    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(max(8, int(torch.empty(()).exponential_(4 / seq_len, generator=generator))))
    return torch.cat([torch.arange(n) for n in lengths])[:seq_len]


def _memory_shortfall(cfg, world, spec: dict) -> Optional[str]:
    """Why a model this size cannot train here (weights, gradients and AdamW state: STATE_BYTES
    per parameter by train.precision, on the GPU or, with cpu_offload, in host memory), or None."""
    if world.device.type != "cuda":
        return None
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.for_model(**OmegaConf.to_container(cfg.model.config)))
    state_gib = STATE_BYTES[cfg.train.precision] * sum(p.numel() for p in meta.parameters()) / 2**30
    if cfg.sharding.cpu_offload:
        have, where = _host_memory_gib(), "host memory"
    else:
        have, where = torch.cuda.get_device_properties(world.device).total_memory / 2**30, "GPU memory"
    need = state_gib * 1.05 + 6
    if need > have:
        return (f"needs ~{need:.0f} GiB of {where} (weights, gradients, AdamW state: {state_gib:.0f} GiB), "
                f"has {have:.0f}")
    return None


def _run_overrides(spec: dict, overrides: list[str], out: Path) -> list[str]:
    steps = SMOKE_RUN_STEPS if spec["smoke"] else RUN_STEPS
    return [*steps, f"sharding.backend={spec['backend']}", *overrides, f"output_dir={out}"]


def _train_run(spec: dict, name: str, overrides: list[str], torchrun: bool = True) -> Path:
    """The run `name` in the work directory, trained now unless an earlier item finished it."""
    out = Path(spec["work"]) / name
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        _run_task(_run_overrides(spec, overrides, out), torchrun)
    return out


def _run_task(overrides: list[str], torchrun: bool):
    """hydralm's task in this process; `torchrun`: under the environment torchrun gives rank 0 of
    one (env:// rendezvous, device_id), else the plain world of one."""
    from launcher.cli.app import run_task

    with _torchrun_environment() if torchrun else nullcontext():
        return run_task(compose(overrides))


@contextmanager
def _torchrun_environment():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)


def _train_losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train_loss"] for row in rows if "train_loss" in row}


def _loss_rel(run: Path, reference: Path) -> float:
    losses, expected = _train_losses(run), _train_losses(reference)
    if losses.keys() != expected.keys():
        raise RuntimeError(f"{run.name} logged steps {sorted(losses)}, {reference.name} {sorted(expected)}")
    return max(abs(losses[step] - expected[step]) / abs(expected[step]) for step in expected)


def _weights_rel(run: Path, reference: Path) -> float:
    from safetensors.torch import load_file

    weights, expected = (load_file(r / "final-model" / "model.safetensors") for r in (run, reference))
    return max(((weights[k] - v).norm() / v.norm().clamp(min=1e-12)).item() for k, v in expected.items())


def _attention_unavailable(attention: str, device) -> Optional[str]:
    if attention == "flash_attention_2" and (device.type != "cuda" or not _version("flash_attn")):
        return "needs CUDA and the flash_attn package"
    return None


def _packed_vs_separate(attention: str, dtype, device, spec: dict) -> float:
    """Relative difference of the packed batch's summed loss and its documents' run one by one."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from launcher.model.losses import token_loss_sum

    hidden, seq_len = (64, 64) if spec["smoke"] else (256, 1024)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(device, dtype).eval()
    reference = copy.deepcopy(model)  # its own config: the attention is a config attribute
    reference.set_attn_implementation("eager")
    batch = _random_batches({"warmup": 0, "steps": 1, "batch": 2, "seq_len": seq_len, "document_mask": True},
                            config.vocab_size, pin=False)[0]
    with torch.no_grad():
        packed = token_loss_sum(model, batch, -100, device)
        separate = torch.zeros((), device=device)
        for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            starts = torch.nonzero(positions == 0).flatten().tolist() + [len(positions)]
            for a, b in zip(starts, starts[1:]):
                piece = {"input_ids": ids[a:b][None], "labels": labels[a:b][None]}
                separate += token_loss_sum(reference, piece, -100, device)
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"the packed batch ran with {model.config._attn_implementation}, not {attention}")
    return (abs(packed - separate) / separate).item()


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _child(name: str, spec: dict, result_path: str, log_path: str) -> None:
    """An item's process: its own process group (a timeout kills everything it started), output to
    its log, the result as JSON."""
    os.setpgrp()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if spec["smoke"]:
        _compile_without_inductor()
    try:
        result = ITEMS_BY_NAME[name].run(spec)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    Path(result_path).write_text(json.dumps(result))


def _compile_without_inductor() -> None:
    """--smoke: torch.compile traces with dynamo and AOTAutograd (backend aot_eager) but leaves out
    inductor's code generation, which takes minutes on a small CPU. A GPU run uses inductor."""
    import functools

    import torch

    torch.compile = functools.partial(torch.compile, backend=SMOKE_COMPILE_BACKEND)


# --- the parent: order, budget, isolation, the JSON and the table -------------------------------------

class Runner:
    """Starts each item in its own process and waits for it under a timeout."""

    PRELOAD = ["bench.gpu_check", "torch", "transformers", "transformers.models.llama.modeling_llama",
               "launcher.cli.app", "tasks.train", "tasks.evaluate"]

    def __init__(self, work: Path):
        self.work = work
        self.isolation = "forkserver"
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(self.PRELOAD)

    def use_spawn(self) -> None:
        """Fresh interpreters: for a platform where processes forked after imports cannot start CUDA."""
        self.isolation = "spawn"
        self.context = multiprocessing.get_context("spawn")

    def run(self, item: Item, spec: dict, timeout: float) -> dict:
        result_path, log_path = self.work / f"{item.name}.result.json", self.work / f"{item.name}.log"
        result_path.unlink(missing_ok=True)
        process = self.context.Process(target=_child, args=(item.name, spec, str(result_path), str(log_path)))
        start = time.perf_counter()
        process.start()
        process.join(timeout)
        timed_out = process.is_alive()
        _kill_group(process.pid)  # a timeout, or anything the item left running
        process.join()
        seconds = time.perf_counter() - start
        tail = _tail(log_path)
        if timed_out:
            return {"status": "timeout", "seconds": seconds, "reason": f"still running after {timeout:.0f} s",
                    "error_tail": tail}
        if process.exitcode != 0 or not result_path.is_file():
            oom = any(text in tail for text in ("OutOfMemoryError", "CUDA out of memory", "out of memory"))
            killed = process.exitcode is not None and process.exitcode < 0
            status = "oom" if oom else "killed" if killed else "error"
            reason = f"exit code {process.exitcode}" + (" (killed by a signal: host out of memory?)" if killed else "")
            return {"status": status, "seconds": seconds, "reason": reason, "error_tail": tail}
        result = json.loads(result_path.read_text())
        if "skipped" in result:
            return {"status": "skipped", "seconds": seconds, "reason": result["skipped"]}
        status = "passed" if result.get("passed") else "failed"
        return {"status": status, "seconds": seconds, **result, **({"log_tail": tail} if status == "failed" else {})}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _spec(item: Item, args, work: Path) -> dict:
    """What an item's process gets: its arguments over the defaults (smoke: tiny shapes, gloo)."""
    spec = {"item": item.name, "smoke": args.smoke, "work": str(work), "backend": "gloo" if args.smoke else "nccl",
            "peak_flops": args.peak_flops, "timeout_s": item.timeout_s, "run_steps": 4 if args.smoke else 20,
            "batch": 8, "seq_len": 2048, "warmup": 3, "steps": 10, "overrides": OVERRIDES.get(item.name, []),
            **item.args}
    spec["batch"] *= spec.pop("batch_factor", 1)
    if args.smoke:
        spec.update(batch=2, seq_len=64, warmup=1, steps=2)
    return spec


def _skip_reason(item: Item, smoke: bool) -> Optional[str]:
    if smoke and item.needs_cuda:
        return f"needs CUDA: {item.needs_cuda}"
    return None


def _git_commit() -> dict:
    def git(*args):
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


def _default_out(report: dict, smoke: bool) -> Path:
    gpu = "smoke" if smoke else report["items"].get("environment", {}).get("figures", {}).get("gpu") or "unknown-gpu"
    slug = "".join(c if c.isalnum() else "-" for c in gpu).strip("-").lower()
    return RESULTS_DIR / f"gpu_check-{slug}-{datetime.date.today().isoformat()}.json"


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)


def _figure_line(entry: dict) -> str:
    """The item's headline, for the table."""
    figures = entry.get("figures", {})
    if entry["status"] not in ("passed", "failed"):
        return entry.get("reason", "")
    if "profile" in figures:
        busy = figures["profile"]["gpu_busy_share_of_wall"]
        top = figures["profile"]["top"][0]
        return (f"{figures['profiled_item']}: GPU busy {'n/a' if busy is None else f'{busy:.0%}'} of wall, "
                f"top {top['name'][:40]} {top['share']:.0%}")
    if "tokens_per_s" in figures:
        mfu = f", MFU {figures['mfu']:.1%} (6N {figures['mfu_6n']:.1%})" if figures.get("mfu") else ""
        return f"{figures['tokens_per_s']:,.0f} tok/s{mfu}, {figures['peak_memory_gib']:.1f} GiB, b{figures['batch']}"
    if "gpu" in figures or "torch" in figures:
        return f"{figures.get('gpu') or 'cpu'}, torch {figures['torch']}, CUDA {figures['cuda']}"
    numbers = [f"{key} {value:.2g}" for key, value in figures.items()
               if isinstance(value, float) and ("rel" in key)]
    return ", ".join(numbers)


def _print_row(name: str, entry: dict) -> None:
    print(f"{name:52s} {entry['status']:8s} {entry.get('seconds', 0):6.1f}s  {_figure_line(entry)}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, gloo: checks the code paths")
    parser.add_argument("--out", type=Path, help="the JSON file (default bench/results/gpu_check-<gpu>-<date>.json)")
    parser.add_argument("--budget-s", type=float, help=f"stop starting items after this (default {DEFAULT_BUDGET_S}; "
                                                      "--smoke: 600)")
    parser.add_argument("--only", help="comma-separated item names (in the listed order)")
    parser.add_argument("--all", action="store_true", help="also the items outside the default set (--smoke: always)")
    parser.add_argument("--skip", help="comma-separated item names")
    parser.add_argument("--peak-flops", type=float, help="dense bf16 FLOP/s of the GPU (default: by its name)")
    parser.add_argument("--list", action="store_true", help="list the items and exit")
    args = parser.parse_args(argv)
    items = _select(args, parser)
    if args.list:
        print(f"{'item (in the order they run)':52s} {'~s on H200':>10s}  what")
        for item in items:
            print(f"{item.name:52s} {item.estimate_s:10.0f}  {item.what}")
        print(f"{'total (estimated; budget ' + str(DEFAULT_BUDGET_S) + ' s by default)':52s} "
              f"{sum(item.estimate_s for item in items):10.0f}")
        return 0
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # no CUDA context before an item's own process
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke is the CPU run, on any machine
    if not args.smoke and not _cuda_present():
        print("bench/gpu_check.py needs a CUDA GPU (none is visible); --smoke checks the code paths on CPU",
              file=sys.stderr)
        return 2
    budget = args.budget_s or (600 if args.smoke else DEFAULT_BUDGET_S)
    return _run_all(items, args, budget)


def _select(args, parser) -> list[Item]:
    """The items to run, in the listed order; `environment` always (the JSON records the setup).
    Without --only: the default set (--all or --smoke: every item)."""
    only, skip = ({n for n in (value or "").split(",") if n} for value in (args.only, args.skip))
    unknown = sorted((only | skip) - ITEMS_BY_NAME.keys())
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; --list shows them")
    every = args.all or args.smoke
    return [item for item in ITEMS if item.name == "environment" or (
        (item.name in only if only else item.default or every) and item.name not in skip)]


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_all(items: list[Item], args, budget: float) -> int:
    start = time.perf_counter()
    report = {"schema": SCHEMA, "mode": "smoke" if args.smoke else "gpu",
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "budget_s": budget, **_git_commit(),
              "isolation": "forkserver", "items": {}}
    if args.smoke:
        report["compile_backend"] = f"{SMOKE_COMPILE_BACKEND} (smoke; inductor on a GPU)"
    out = args.out
    print(f"hydralm gpu check ({report['mode']}): {len(items)} items, budget {budget:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="hydralm-gpu-check-") as tmp:
        runner = Runner(Path(tmp))
        for item in items:  # `environment` first: it names the GPU in the default file name
            entry = _run_item(item, args, runner, Path(tmp), budget - (time.perf_counter() - start), report, out)
            report["items"][item.name] = entry
            report["isolation"] = runner.isolation
            report["wall_s"] = time.perf_counter() - start
            out = out or _default_out(report, args.smoke)
            _write(report, out)
            _print_row(item.name, entry)
    report["ratios"] = _ratios(report)
    report["targets"] = _targets(report)
    _write(report, out)
    _print_table(report, out)
    bad = [name for name, entry in report["items"].items() if entry["status"] not in ("passed", "skipped")]
    return 1 if bad else 0


def _run_item(item: Item, args, runner: Runner, work: Path, remaining: float, report: Optional[dict] = None,
              out: Optional[Path] = None) -> dict:
    reason = _skip_reason(item, args.smoke)
    if reason:
        return {"group": item.group, "what": item.what, "status": "skipped", "seconds": 0.0, "reason": reason}
    needed = MIN_START_S if args.smoke else max(MIN_START_S, item.estimate_s)  # --smoke: estimates are GPU seconds
    if remaining < needed:
        return {"group": item.group, "what": item.what, "status": "skipped", "seconds": 0.0,
                "reason": f"budget: needs ~{needed:.0f} s, {remaining:.0f} s left of --budget-s"}
    spec = _spec(item, args, work)
    if item.name == "profile":
        spec = _profile_spec(item, args, work, report or {"items": {}}, out)
    entry = runner.run(item, spec, min(item.timeout_s, remaining))
    if entry["status"] == "timeout" and remaining < item.timeout_s:
        entry["reason"] += " (the rest of --budget-s)"
    if item.name == "environment" and entry["status"] == "error" and runner.isolation == "forkserver" \
            and "CUDA" in entry.get("error_tail", ""):
        runner.use_spawn()  # CUDA refused a forked process: fresh interpreters from here on
        entry = runner.run(item, spec, min(item.timeout_s, remaining))
    return {"group": item.group, "what": item.what, **entry}


def _profile_spec(item: Item, args, work: Path, report: dict, out: Optional[Path]) -> dict:
    """The fastest hydralm 1.1B item measured so far in this run (else the default flags), run
    again with its own overrides under the profiler."""
    measured = {name: entry["figures"]["tokens_per_s"] for name, entry in report["items"].items()
                if name in PROFILE_CANDIDATES and entry.get("status") == "passed"}
    best = max(measured, key=measured.get) if measured else PROFILE_CANDIDATES[0]
    spec = _spec(ITEMS_BY_NAME[best], args, work)
    profile_path = (out or work / "gpu_check.json").with_suffix(".profile.txt")
    spec.update(item=item.name, profile=True, profiled_item=best, profile_path=str(profile_path),
                steps=min(spec["steps"], item.args["steps"]), timeout_s=item.timeout_s)
    return spec


def _print_table(report: dict, out: Path) -> None:
    environment = report["items"].get("environment", {}).get("figures", {})
    print(f"\nhydralm gpu check ({report['mode']}{': figures mean nothing' if report['mode'] == 'smoke' else ''}), "
          f"{environment.get('gpu') or 'cpu'}, torch {environment.get('torch')}, CUDA {environment.get('cuda')}, "
          f"transformers {environment.get('transformers')}, commit {str(report.get('git_commit'))[:10]}, "
          f"{report['wall_s']:.0f} s")
    print(f"{'item':52s} {'status':8s} {'time':>7s}  figures")
    for name, entry in report["items"].items():
        _print_row(name, entry)
    for what, value, goal, verdict in report["targets"]:
        shown = (lambda x: f"{x:.1%}") if "MFU" in what else (lambda x: f"{x:.2f}x")
        print(f"target {what} >= {shown(goal)}: " + (verdict if value is None else f"{shown(value)} ({verdict})"))
    print(f"-> {out}")
    publish(report, None, report["ratios"])  # the ratio lines, last


def _ratios(report: dict) -> dict:
    speeds = {name: entry["figures"]["tokens_per_s"] for name, entry in report["items"].items()
              if entry["status"] == "passed" and "tokens_per_s" in entry.get("figures", {})}
    return {name: speeds[a] / speeds[b] for name, (a, b) in RATIOS.items() if a in speeds and b in speeds}


def _targets(report: dict) -> list:
    """[what, measured value or None, goal, met | missed | not measured] for each of TARGETS."""
    rows = []
    for what, source, figure, goal in TARGETS:
        entry = report["items"].get(source, {})
        value = report["ratios"].get(source) if figure == "ratio" else \
            entry.get("figures", {}).get(figure) if entry.get("status") == "passed" else None
        rows.append([what, value, goal, "not measured" if value is None else "met" if value >= goal else "missed"])
    return rows


if __name__ == "__main__":
    import bench.gpu_check as module  # its functions pickle by this name for the item processes

    sys.exit(module.main())
