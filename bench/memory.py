"""Host memory of a ~0.5B-parameter Llama on 2 CPU ranks (FSDP2 full_shard), checkpoint cost, export.

A random Llama (hidden 1024, 32 layers, intermediate 2816, vocab 32000: 477M parameters, 1.9 GB
of fp32 safetensors) is written to disk once (cached under $HYDRALM_CACHE/bench). Every run is
`python -m launcher` as 2 ranks started with RANK/WORLD_SIZE (as SLURM starts them), so each
rank's peak resident memory is its own ru_maxrss (os.wait4). Figures:

- baseline: one rank's runtime (python, torch, transformers, hydralm, the process group);
- loading (`task=export` of model.path: load, shard, gather one tensor at a time), with and
  without `sharding.low_cpu_mem_usage`: with it, rank 1 never holds the whole model;
- training, 2 optimizer steps and a checkpoint, with and without `low_cpu_mem_usage`: each rank's
  peak against its sharded state (parameters, gradients, AdamW moments / 2) plus the baseline;
  `summary.json`'s `peak_host_mem_gib` must agree with what the OS reports;
- the checkpoint's size, save time and load time (the run's own log lines);
- `task=export` of that 2-rank checkpoint: rank 0's peak beyond the baseline, against the README's
  bound (its shard of the weights plus the largest tensor and the all-gather's buffer).

The last line is the verdict. Uses ~12 GB of memory at its peak; ~15 min on 2 busy cores.

    python bench/memory.py            # the 0.5B model
    python bench/memory.py --smoke    # a tiny model through the same steps, without the contrasts
                                      # (figures mean nothing)
    python bench/memory.py --precision fp32,mixed,bf16,bf16_sr
                                      # instead: bytes per parameter of each train.precision, one
                                      # process, one optimizer step: (peak - baseline) / parameters
"""

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, publish, subprocess_env

GIB = 2**30
TOKENIZER = ROOT / "launcher" / "assets" / "tiny_bpe"
REAL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256)
# Small batches: the bench is about the weights and optimizer state, not activations.
RUN = ["model=local", "sharding=full_shard", "data.train_bs=1", "data.eval_bs=1", "train.max_seq_len=128",
       "train.max_steps=2", "train.logging_steps=2", "train.max_eval_batches=1", "scheduler.warmup_ratio=0"]
LOAD_RATIO, STATE_FACTOR = 0.6, 1.3  # targets: rank 1 / rank 0 when loading; peak / (state + baseline)
# Export: rank 0 holds its shard and one gathered tensor, plus the all-gather's own buffers (about
# one more copy on gloo, measured); 10% for the allocator and the checkpoint reader's buffers.
GATHER_COPIES, EXPORT_SLACK = 2, 1.1


def model_dir(spec: dict, cache: Path) -> Path:
    """The random Llama of `spec`, saved once (safetensors + the tiny tokenizer)."""
    name = "llama-" + "-".join(f"{v}" for v in spec.values())
    path = cache / name
    if (path / "model.safetensors").is_file():
        return path
    code = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "torch.manual_seed(0)\n"
        f"config = AutoConfig.for_model(model_type='llama', tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **{spec!r})\n"
        "AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(sys.argv[1] + '.partial')\n"
        f"AutoTokenizer.from_pretrained({str(TOKENIZER)!r}).save_pretrained(sys.argv[1] + '.partial')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=subprocess_env(threads=2))
    os.replace(f"{path}.partial", path)
    return path


def run_ranks(args: list[str], cwd: Path, world_size: int = 2) -> list[float]:
    """`python -m launcher ARGS` as `world_size` ranks; each rank's peak resident memory (GiB)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Unbuffered: a rank that dies shows in its log how far it got.
    env = subprocess_env(threads=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                         LOCAL_WORLD_SIZE=str(world_size), PYTHONUNBUFFERED="1")
    run = len(list(cwd.glob("rank0-*.log")))
    logs = [cwd / f"rank{rank}-{run}.log" for rank in range(world_size)]
    ranks = [subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank, log in enumerate(logs)]
    endings, peaks = {}, []
    for rank, process in enumerate(ranks):
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        endings[rank] = _ending(process.returncode)
        peaks.append(usage.ru_maxrss / 2**20)  # KiB on Linux
        if process.returncode != 0:
            for other, rest in enumerate(ranks):
                if other not in endings:
                    endings[other] = _ended_or_stopped(rest)
            sys.exit(f"benchmark run failed (python -m launcher {' '.join(args)}):\n" + "".join(
                f"--- rank {r}: {endings[r]}; the end of its log:\n{log.read_text()[-3000:]}\n"
                for r, log in enumerate(logs)))
    return peaks


def _ended_or_stopped(process: subprocess.Popen, grace_s: float = 10) -> str:
    """How a rank still running after another failed ends: on its own (its own error), or killed."""
    try:
        return _ending(process.wait(timeout=grace_s))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return f"still running {grace_s:g} s after, stopped by the benchmark"


def _ending(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def baseline_gib(cwd: Path) -> float:
    """Peak resident memory of a rank that imports what a task imports and forms its process group."""
    code = ("import resource, tasks.export\n"
            "from launcher.distributed import distributed\n"
            "with distributed():\n"
            "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(threads=1), check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1])


def sharded_state_gib(parameters: int, world_size: int = 2) -> float:
    """fp32 parameters, gradients and two AdamW moments, split over the ranks."""
    return 4 * 4 * parameters / world_size / GIB


def log_seconds(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model through the same steps")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--precision", help="comma-separated train.precision modes: bytes/param of each, nothing else")
    parser.add_argument("--layers", type=int, help="decoder layers of the model (default: 32, the 0.5B model)")
    args = parser.parse_args()
    spec = SMOKE if args.smoke else REAL
    if args.layers:
        spec = {**spec, "num_hidden_layers": args.layers}
    cache = Path(os.environ.get("HYDRALM_CACHE", Path.home() / ".cache" / "hydralm")) / "bench"
    checkpoint = model_dir(spec, cache)
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        sizes = [math.prod(f.get_slice(k).get_shape()) for k in f.keys()]
    parameters, largest_gib = sum(sizes), 4 * max(sizes) / GIB
    figures = {"parameters": parameters}

    if args.precision:
        return precision_bytes(args.precision.split(","), checkpoint, parameters, args.json)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = baseline_gib(work)
        state = sharded_state_gib(parameters)
        figures.update(baseline_gib=base, sharded_state_gib=state, largest_tensor_gib=largest_gib)
        print(f"model: {parameters / 1e6:.0f}M parameters ({checkpoint}); runtime baseline {base:.2f} GiB; "
              f"sharded state {state:.2f} GiB per rank; largest tensor {largest_gib:.3f} GiB", flush=True)

        contrasts = ("true",) if args.smoke else ("true", "false")  # smoke: the code path once
        for low in contrasts:
            out = work / f"load-{low}"
            peaks = run_ranks(["task=export", *RUN, f"model.path={checkpoint}", f"sharding.low_cpu_mem_usage={low}",
                               f"output_dir={out}"], work)
            figures[f"load_peak_gib_low_cpu_{low}"] = peaks
            print(f"loading (export of model.path), low_cpu_mem_usage={low}: peak rank 0 {peaks[0]:.2f} / "
                  f"rank 1 {peaks[1]:.2f} GiB (rank 1 / rank 0 = {peaks[1] / peaks[0]:.2f})", flush=True)

        for low in contrasts:
            out = work / f"train-{low}"
            peaks = run_ranks([*RUN, f"model.path={checkpoint}", f"sharding.low_cpu_mem_usage={low}",
                               "train.checkpointing_enabled=true", "train.save_steps=2", f"output_dir={out}"], work)
            recorded = json.loads((out / "summary.json").read_text())["peak_host_mem_gib"]
            figures[f"train_peak_gib_low_cpu_{low}"] = peaks
            figures[f"train_summary_peak_gib_low_cpu_{low}"] = recorded
            print(f"training, 2 steps + checkpoint, low_cpu_mem_usage={low}: peak rank 0 {peaks[0]:.2f} / rank 1 "
                  f"{peaks[1]:.2f} GiB = {peaks[0] / (state + base):.2f} / {peaks[1] / (state + base):.2f} x "
                  f"(sharded state + baseline); summary.json: {recorded[0]:.2f} / {recorded[1]:.2f}", flush=True)

        trained = work / "train-true"
        saved = trained / "checkpoints" / "checkpoint-00000002"
        size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) / GIB
        save_s = log_seconds((trained / "hydralm.log").read_text(), r"saved \S+ in ([0-9.]+) s")
        run_ranks([*RUN, f"model.path={checkpoint}", "sharding.low_cpu_mem_usage=true", "train.checkpointing_enabled=true",
                   "train.save_steps=2", f"resume={saved}", f"output_dir={work / 'resumed'}"], work)
        load_s = log_seconds(_console(work), r"read in ([0-9.]+) s")
        figures.update(checkpoint_gib=size, checkpoint_save_s=save_s, checkpoint_load_s=load_s)
        print(f"checkpoint (model + AdamW state, 2 ranks): {size:.2f} GiB, saved in {save_s:.1f} s, "
              f"read in {load_s:.1f} s", flush=True)

        peaks = run_ranks(["task=export", *RUN, f"model.path={checkpoint}", f"checkpoint={saved}",
                           f"output_dir={work / 'export'}"], work)
        beyond = peaks[0] - base
        bound = parameters * 4 / 2 / GIB + GATHER_COPIES * largest_gib
        figures.update(export_peak_gib=peaks, export_rank0_beyond_baseline_gib=beyond, export_bound_gib=bound)
        print(f"export of the 2-rank checkpoint: rank 0 peak {peaks[0]:.2f} GiB, {beyond:.2f} GiB beyond the "
              f"baseline; README bound (its shard + {GATHER_COPIES} x the largest tensor) {bound:.2f} GiB", flush=True)

    load_ratio = figures["load_peak_gib_low_cpu_true"][1] / figures["load_peak_gib_low_cpu_true"][0]
    train_factor = max(figures["train_peak_gib_low_cpu_true"]) / (state + base)
    summary_agrees = all(abs(a - b) < 0.05 * a for a, b in zip(figures["train_peak_gib_low_cpu_true"],
                                                               figures["train_summary_peak_gib_low_cpu_true"]))
    checks = {f"load rank1/rank0 {load_ratio:.2f} < {LOAD_RATIO}": load_ratio < LOAD_RATIO,
              f"train peak {train_factor:.2f} <= {STATE_FACTOR} x (state + baseline)": train_factor <= STATE_FACTOR,
              "summary.json peaks match the OS": summary_agrees,
              f"export {beyond:.2f} <= {EXPORT_SLACK} x {bound:.2f} GiB": beyond <= EXPORT_SLACK * bound}
    figures["checks"] = checks
    publish(figures, args.json)
    failed = [name for name, ok in checks.items() if not ok]
    smoke = " (smoke: figures mean nothing)" if args.smoke else ""
    print(f"verdict: {'PASS' if not failed else 'FAIL'}{smoke}: " + "; ".join(
        f"{name} {'ok' if ok else 'FAILED'}" for name, ok in checks.items()))


def precision_bytes(modes: list[str], checkpoint: Path, parameters: int, json_path) -> None:
    """Peak resident memory of one process training one step in each mode, beyond the runtime
    baseline, per parameter: weights + gradients + AdamW state (+ the small batch's activations)."""
    figures = {"parameters": parameters}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = baseline_gib(work)
        figures["baseline_gib"] = base
        for mode in modes:
            peak, = run_ranks([*RUN, "sharding=auto", "train.max_steps=1", "train.logging_steps=1",
                               f"train.precision={mode}", f"model.path={checkpoint}", f"output_dir={work / mode}"],
                              work, world_size=1)
            per_param = (peak - base) * GIB / parameters
            figures[f"bytes_per_param_{mode}"] = per_param
            print(f"train.precision={mode}: peak {peak:.2f} GiB, {peak - base:.2f} GiB beyond the baseline = "
                  f"{per_param:.1f} bytes/parameter ({parameters / 1e6:.0f}M parameters, 1 step)", flush=True)
    publish(figures, json_path)


def _console(work: Path) -> str:
    """What the ranks printed (rank 0 prints the resume line)."""
    return "".join(p.read_text() for p in sorted(work.glob("rank*.log")))


if __name__ == "__main__":
    main()
