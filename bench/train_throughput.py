"""Training throughput on CPU: hydralm's train task against transformers.Trainer and a bare loop.

All three train the same randomly initialised Llama (built by hydralm's `build_model` from one
composed config), on the same packed rows of the pydoc corpus, with the same fused AdamW
(Trainer's default implementation), cosine schedule, gradient clipping, fp32, batch and sequence
length, for the same number of optimizer steps. The first half of the steps is warm-up (hydralm
evaluates and logs at its end); each later step is timed from the end of one optimizer step to
the end of the next, data loading and logging included, by the wall clock and by the process's
CPU time. A run's figure is its median step; each run is its own process; the contenders
alternate, and the median of the repeats is reported. The ratios use CPU time by default: on a
machine shared with other work, wall time mostly measures the neighbours (`--clock wall`).

    python bench/train_throughput.py            # ~5 min on a 2-core machine
    python bench/train_throughput.py --smoke    # seconds: a tiny model, one repeat

The last two lines are `ratio hydralm/trainer: <x>` and `ratio hydralm/bare: <y>`.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import compose, last_json_line, median, publish, run_checked, subprocess_env

CONTENDERS = ("hydralm", "trainer", "bare")
CLOCKS = ("wall", "cpu")

# hidden 512, 8 layers, vocab 4096 (the committed tokenizer): 29.5M parameters.
REAL = dict(
    model={"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
           "num_attention_heads": 8, "num_key_value_heads": 8},
    seq_len=64, batch=4, measured_steps=8, repeats=3,
)
SMOKE = dict(
    model={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2},
    seq_len=32, batch=2, measured_steps=2, repeats=1,
)


def hydralm_overrides(spec: dict) -> list[str]:
    """The launcher overrides every contender's setup is read from."""
    steps = 2 * spec["measured_steps"]
    return [
        *(f"model.config.{key}={value}" for key, value in spec["model"].items()),
        "data=preprocessed", f"data.train_ds={spec['data_dir']}/train", f"data.eval_ds={spec['data_dir']}/eval",
        f"data.train_bs={spec['batch']}", f"data.eval_bs={spec['batch']}",
        f"train.max_seq_len={spec['seq_len']}", "train.epochs=1", f"train.max_steps={steps}",
        # One log window of warm-up, one measured; eval at the log points is kept minimal.
        f"train.logging_steps={spec['measured_steps']}", "train.max_eval_batches=1",
        "train.max_grad_norm=1.0", "train.precision=fp32", "sharding=no_shard",
        "optimizer=adamw", "+optimizer.fused=true", "scheduler=cosine",
    ]


def prepare_data(spec: dict) -> None:
    """Pack the pydoc corpus at the benchmark's sequence length; keep exactly the rows needed."""
    import torch

    from launcher.data.preprocessing import prepared_splits
    from launcher.distributed import World
    from launcher.model.modeling import load_tokenizer

    pydoc = [o for o in hydralm_overrides(spec) if not o.startswith(("data=", "data.train_ds", "data.eval_ds"))]
    cfg = compose(pydoc)
    rows = spec["batch"] * 2 * spec["measured_steps"]
    splits = prepared_splits(cfg, load_tokenizer(cfg.model), World(0, 0, 1, 1, torch.device("cpu")))
    for name, count in (("train", rows), ("eval", spec["batch"])):
        dataset = splits[name].select(range(count))  # full-length rows: only the last one is short
        assert all(len(ids) == spec["seq_len"] for ids in dataset["input_ids"])
        dataset.save_to_disk(f"{spec['data_dir']}/{name}")


class StepClock:
    """Wall and CPU time at the end of every optimizer step; medians over the measured steps."""

    def __init__(self, spec: dict):
        self.spec, self.marks = spec, []

    def tick(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def result(self) -> dict:
        # Step k's time is mark[k] - mark[k-1]; the first measured step follows hydralm's eval, so
        # it starts at the mark after it.
        first = self.spec["measured_steps"] + 1
        steps = list(zip(self.marks[first - 1:], self.marks[first:]))
        tokens = self.spec["batch"] * self.spec["seq_len"]
        return {clock: tokens / median([end[i] - start[i] for start, end in steps])
                for i, clock in enumerate(("wall", "cpu"))}


def hydralm_worker(spec: dict) -> dict:
    """hydralm's train task as `python -m launcher` runs it, timed at the end of every step."""
    import launcher.training.metrics
    from launcher.cli.app import run_task

    clock = StepClock(spec)
    advance = launcher.training.metrics.RunLog.advance  # called once per optimizer step, after it

    def timed_advance(run_log):
        clock.tick()
        advance(run_log)

    launcher.training.metrics.RunLog.advance = timed_advance
    with tempfile.TemporaryDirectory() as out:
        run_task(compose([*hydralm_overrides(spec), f"output_dir={out}"]))
    return clock.result()


def _model_and_config(spec: dict):
    import torch

    from launcher.distributed import World, seed_everything
    from launcher.model.modeling import build_model, load_tokenizer

    cfg = compose(hydralm_overrides(spec))
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, load_tokenizer(cfg.model), World(0, 0, 1, 1, torch.device("cpu")))
    return model.train(), cfg


def trainer_worker(spec: dict) -> dict:
    """transformers.Trainer with the same setup, timed by a callback at the end of every step."""
    from datasets import load_from_disk
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, cfg = _model_and_config(spec)
    total = cfg.train.max_steps
    clock = StepClock(spec)

    class TickEveryStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    opt = cfg.optimizer
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=total, per_device_train_batch_size=cfg.data.train_bs,
            optim="adamw_torch_fused", learning_rate=opt.lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps,
            lr_scheduler_type="cosine", warmup_steps=math.ceil(cfg.scheduler.warmup_ratio * total),
            max_grad_norm=cfg.train.max_grad_norm, seed=cfg.train.seed, use_cpu=True,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, disable_tqdm=True,
        )
        train = load_from_disk(cfg.data.train_ds).select_columns(["input_ids", "labels"])
        Trainer(model=model, args=args, train_dataset=train, callbacks=[TickEveryStep()]).train()
    return clock.result()


def bare_worker(spec: dict) -> dict:
    """The practical limit: forward, loss, backward, clip, step on tensors built beforehand."""
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk
    from transformers import get_cosine_schedule_with_warmup

    model, cfg = _model_and_config(spec)
    total, bs = cfg.train.max_steps, cfg.data.train_bs
    kwargs = {key: value for key, value in cfg.optimizer.items() if key != "_target_"}
    optimizer = torch.optim.AdamW(model.parameters(), **kwargs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.scheduler.warmup_ratio * total), total)
    input_ids = load_from_disk(cfg.data.train_ds).with_format("torch")[:]["input_ids"].long()
    next_tokens = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    clock = StepClock(spec)
    for step in range(total):
        rows = slice(step * bs, (step + 1) * bs)
        logits = model(input_ids=input_ids[rows]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), next_tokens[rows].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return {**clock.result(), "params": sum(p.numel() for p in model.parameters())}


WORKERS = {"hydralm": hydralm_worker, "trainer": trainer_worker, "bare": bare_worker}


def run_worker(contender: str, spec: dict, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", contender, "--spec", json.dumps(spec)]
    return last_json_line(run_checked(cmd, env=subprocess_env(spec["threads"]), cwd=work))


def benchmark(spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="hydralm-bench-") as tmp:
        work = Path(tmp)
        spec = {**spec, "data_dir": str(work / "data")}
        prepare_data(spec)
        runs = {clock: {name: [] for name in CONTENDERS} for clock in CLOCKS}
        params = None
        for repeat in range(spec["repeats"]):
            order = CONTENDERS[repeat % 3:] + CONTENDERS[:repeat % 3]  # nobody always goes first
            for contender in order:
                result = run_worker(contender, spec, work)
                for clock in CLOCKS:
                    runs[clock][contender].append(result[clock])
                params = result.get("params", params)
                print(f"  run {repeat + 1}/{spec['repeats']} {contender:8s} {result['wall']:9.1f} tokens/s wall, "
                      f"{result['cpu']:9.1f} tokens/CPU-s", flush=True)
    tokens_per_s = {clock: {name: median(values) for name, values in by_name.items()} for clock, by_name in runs.items()}
    ratios = {clock: {"trainer": tps["hydralm"] / tps["trainer"], "bare": tps["hydralm"] / tps["bare"]}
              for clock, tps in tokens_per_s.items()}
    return {"runs": runs, "tokens_per_s_by_clock": tokens_per_s, "ratios_by_clock": ratios, "params": params}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat: checks the code path")
    parser.add_argument("--repeats", type=int, help="alternating runs per contender (median is reported)")
    parser.add_argument("--steps", type=int, help="measured optimizer steps (as many again are warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every contender (default 1)")
    parser.add_argument("--clock", choices=CLOCKS, default="cpu", help="what the ratio lines use (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print(json.dumps(result))
        return result

    spec = dict(SMOKE if args.smoke else REAL, threads=args.threads)
    spec["repeats"] = args.repeats or spec["repeats"]
    spec["measured_steps"] = args.steps or spec["measured_steps"]
    print(f"train throughput: CPU, fp32, batch {spec['batch']} x seq {spec['seq_len']}, "
          f"{spec['measured_steps']} warm-up steps then {spec['measured_steps'] - 1} timed, "
          f"{spec['threads']} thread(s), {spec['repeats']} alternating repeat(s)", flush=True)
    result = benchmark(spec)
    tps = result["tokens_per_s_by_clock"]
    print(f"model: {result['params'] / 1e6:.1f}M parameters")
    print(f"{'contender':10s} {'tokens/s (wall)':>16s} {'tokens/CPU-s':>13s}  (medians of the runs' median steps)")
    for name in CONTENDERS:
        print(f"{name:10s} {tps['wall'][name]:16.1f} {tps['cpu'][name]:13.1f}")
    other = "wall" if args.clock == "cpu" else "cpu"
    ratios = result["ratios_by_clock"]
    print(f"by {other} time: hydralm/trainer {ratios[other]['trainer']:.3f}, hydralm/bare {ratios[other]['bare']:.3f}")
    print(f"by {args.clock} time:")
    result.update(clock=args.clock, tokens_per_s=tps[args.clock], ratio_trainer=ratios[args.clock]["trainer"],
                  ratio_bare=ratios[args.clock]["bare"])
    return publish(result, args.json, {"hydralm/trainer": result["ratio_trainer"], "hydralm/bare": result["ratio_bare"]})


if __name__ == "__main__":
    main()
