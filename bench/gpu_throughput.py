"""GPU training throughput and MFU of hydralm's train step on a ~1B-parameter Llama.

A random-init Llama (TinyLlama-1.1B shapes), bf16 compute with fp32 master weights
(`train.use_mp=true`), seq 2048, `sharding=full_shard` on one GPU, fused AdamW, gradient
clipping: hydralm's own `prepare_model` and `optimizer_step`. Variants: sdpa and (if flash_attn is
installed) flash_attention_2, each with and without `train.compile` and activation
checkpointing, each in its own process.

MFU = 6 x parameters x tokens/s / peak bf16 FLOP/s (the usual estimate: attention FLOPs are not
counted). The peak comes from the GPU's name (PEAK_BF16_FLOPS) or `--peak-flops`.

    python bench/gpu_throughput.py                      # needs CUDA; ~1 min per variant
    python bench/gpu_throughput.py --variants sdpa,sdpa+compile
    python bench/gpu_throughput.py --smoke              # CPU, tiny model: checks the code path
"""

import argparse
import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import compose, last_json_line, run_checked, subprocess_env

# Dense bf16 peak, FLOP/s, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}

# TinyLlama-1.1B's shapes: 1.10B parameters.
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 64}


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)


def all_variants() -> list[str]:
    attentions = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    return ["+".join([attn, *extras]) for attn, extras in itertools.product(
        attentions, ([], ["compile"], ["ac"], ["compile", "ac"]))]


def variant_overrides(variant: str, shape: dict, seq_len: int) -> list[str]:
    attention, *extras = variant.split("+")
    unknown = set(extras) - {"compile", "ac"}
    if unknown:
        sys.exit(f"unknown variant part(s) {sorted(unknown)} in {variant}; use ATTENTION[+compile][+ac]")
    return [
        *(f"model.config.{key}={value}" for key, value in shape.items()),
        f"model.attention={attention}", f"train.compile={'compile' in extras}",
        f"train.use_activation_checkpointing={'ac' in extras}", f"train.max_seq_len={seq_len}",
        "sharding=full_shard", "train.use_mp=true", "train.max_grad_norm=1.0",
        "optimizer=adamw", "+optimizer.fused=true",
    ]


def measure(spec: dict) -> dict:
    """One variant, in this process: warm-up steps, then timed steps of hydralm's `optimizer_step`."""
    import torch

    from launcher.distributed import distributed, seed_everything
    from launcher.modeling import build_model, load_tokenizer
    from launcher.optim import build_optimizer
    from launcher.sharding import prepare_model
    from launcher.language_modeling import LanguageModeling
    from launcher.trainer import optimizer_step

    cfg = compose(spec["overrides"])
    with distributed(cfg.sharding.backend) as world:
        seed_everything(cfg.train.seed)
        with world.device:  # initialise the weights where they will live
            model = build_model(cfg.model, load_tokenizer(cfg.model), world)
        params = sum(p.numel() for p in model.parameters())
        model = prepare_model(model, cfg, world)
        optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        vocab = cfg.model.config.vocab_size
        shape = (spec["batch"], spec["seq_len"])
        task = LanguageModeling(cfg)
        batches = [{"input_ids": ids, "labels": ids, "input_tokens": torch.tensor(ids.numel())} for ids in
                   (torch.randint(vocab, shape).pin_memory() if world.device.type == "cuda" else torch.randint(vocab, shape)
                    for _ in range(spec["warmup"] + spec["steps"]))]
        for step, batch in enumerate(batches):
            if step == spec["warmup"]:
                _synchronize(world.device)
                start = time.perf_counter()
            optimizer_step(model, optimizer, [batch], task, world)
        _synchronize(world.device)
        seconds = time.perf_counter() - start
    result = {"params": params, "tokens_per_s": spec["steps"] * shape[0] * shape[1] / seconds,
              "step_s": seconds / spec["steps"]}
    if world.device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(world.device)
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
    return result


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one variant: checks the code path")
    parser.add_argument("--variants", help="comma-separated ATTENTION[+compile][+ac] (default: all)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--peak-flops", type=float, help="peak bf16 FLOP/s of the GPU (default: by its name)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = measure(json.loads(args.worker))
        print(json.dumps(result))
        return result

    if args.smoke:
        shape, variants = TINY, ["sdpa+ac"]
        args.batch, args.seq_len, args.steps, args.warmup = 2, 64, 2, 1
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench/gpu_throughput.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                     "--smoke checks the code path on CPU")
        shape, variants = ONE_B, args.variants.split(",") if args.variants else all_variants()
    results = {}
    for variant in variants:
        spec = {"overrides": variant_overrides(variant, shape, args.seq_len), "batch": args.batch,
                "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        results[variant] = last_json_line(run_checked(cmd, env=subprocess_env()))
        print(f"  {variant}: {results[variant]['tokens_per_s']:.0f} tokens/s", flush=True)

    first = next(iter(results.values()))
    device = first.get("device", "cpu")
    peak = args.peak_flops or peak_flops(device)
    print(f"gpu throughput: {device}, {first['params'] / 1e6:.1f}M parameters, bf16 (fp32 master weights), "
          f"full_shard, batch {args.batch} x seq {args.seq_len}, {args.steps} timed steps after {args.warmup}")
    print(f"peak bf16: {peak / 1e12:.0f} TFLOP/s" if peak else "peak bf16: unknown (give --peak-flops) -> no MFU")
    print(f"{'variant':32s} {'tokens/s':>10s} {'MFU':>7s} {'step s':>7s} {'peak mem GiB':>13s}")
    for variant, result in results.items():
        result["mfu"] = 6 * result["params"] * result["tokens_per_s"] / peak if peak else None
        mfu = f"{result['mfu']:.1%}" if peak else "-"
        memory = f"{result['peak_memory_gib']:.1f}" if "peak_memory_gib" in result else "-"
        print(f"{variant:32s} {result['tokens_per_s']:10.0f} {mfu:>7s} {result['step_s']:7.3f} {memory:>13s}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "peak_flops": peak, "variants": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
