"""`python -m bench [--smoke]`: run the CPU benchmarks and print one summary table.

bench/gpu_check.py (the GPU checklist) needs a GPU and runs on its own.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import subprocess_env

HERE = Path(__file__).resolve().parent


def run(script: str, flags: list[str], out: Path) -> dict:
    """Run one benchmark script (its output streams through) and read its --json results."""
    subprocess.run([sys.executable, str(HERE / script), *flags, "--json", str(out)], env=subprocess_env(), check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every benchmark in its seconds-long smoke mode")
    args = parser.parse_args()
    flags = ["--smoke"] if args.smoke else []
    with tempfile.TemporaryDirectory() as tmp:
        train = run("train_throughput.py", flags, Path(tmp) / "train.json")
        startup = run("startup.py", flags, Path(tmp) / "startup.json")
    tokens, unit = train["tokens_per_s"], "tokens/CPU-s" if train["clock"] == "cpu" else "tokens/s"
    rows = [
        (f"train: hydralm {unit}", f"{tokens['hydralm']:.0f}", ""),
        (f"train: Trainer {unit}", f"{tokens['trainer']:.0f}", ""),
        (f"train: bare loop {unit}", f"{tokens['bare']:.0f}", ""),
        ("ratio hydralm/trainer", f"{train['ratio_trainer']:.3f}", ">= 1.10"),
        ("ratio hydralm/bare", f"{train['ratio_bare']:.3f}", ">= 0.95"),
        ("--cfg job: launcher s", f"{startup['cfg_job_s']['launcher']:.2f}", ""),
        ("--cfg job: minimal @hydra.main s", f"{startup['cfg_job_s']['minimal']:.2f}", ""),
        ("ratio cfg-job/minimal-hydra", f"{startup['ratio']:.3f}", "<= 1.3"),
        ("heavy imports in --cfg job", ", ".join(startup["heavy_imports"]) or "none", "none"),
        *((f"first step, default run ({label}) s", f"{times['task_to_first_step_s']:.2f}", "")
          for label, times in startup["first_step"].items()),
        ("8-point task=validate s", f"{startup['validate_sweep']['wall_s']:.2f}", ""),
        ("8-point SLURM sweep submission s", f"{startup['slurm_submission_s']:.2f}", "< 2"),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"\nsummary{' (smoke: code path only, figures mean nothing)' if args.smoke else ''}")
    print(f"{'figure':{width}s}  {'value':>10s}  target")
    for name, value, target in rows:
        print(f"{name:{width}s}  {value:>10s}  {target}")


if __name__ == "__main__":
    main()
