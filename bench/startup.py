"""Launch overhead: `python -m launcher --cfg job` against a minimal `@hydra.main` app on the same
config tree, time to the first optimizer step of the default run, the time `task=validate` takes
to check a sweep of 8 points (and what it imports), and the launcher time to submit a sweep of 8
points to SLURM (through hydra-submitit-launcher, with stand-in `sbatch`, `sinfo` and `srun`: no
SLURM needs to be installed; every point's config is checked before it).

    python bench/startup.py            # ~2 min on a 2-core machine
    python bench/startup.py --smoke    # one run of each, a 1-step tiny run

The last line is `ratio cfg-job/minimal-hydra: <z>`.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, publish, run_checked, subprocess_env

LAUNCHER = [sys.executable, "-m", "launcher"]
MINIMAL_APP = [sys.executable, str(Path(__file__).with_name("minimal_hydra_app.py"))]
HEAVY_MODULES = ("torch", "transformers", "datasets")
SWEEP_POINTS = 8

FAKE_SBATCH = """#!/bin/sh
# Stands in for SLURM's sbatch: note when the launcher got here, answer like sbatch does.
python3 -c 'import time; print(time.time())' > "$HYDRALM_BENCH_SUBMITTED"
echo "Submitted batch job 4242"
"""

# Stands in for SLURM's sinfo (the launcher checks requests against the partition): one node.
FAKE_SINFO = """#!/bin/sh
echo 'debug*|n1|16|64000|(null)'
"""

# submitit's SLURM executor only checks that srun exists (the job script runs it on the cluster).
FAKE_SRUN = """#!/bin/sh
echo 'srun stand-in: the benchmark submits, it runs no job' >&2
exit 1
"""


def wall_time(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    run_checked(cmd, env=env, cwd=cwd)
    return time.perf_counter() - start


def cfg_job_times(repeats: int, work: Path) -> dict:
    """Alternating runs of both apps; median wall time of each."""
    env = subprocess_env()
    times = {"launcher": [], "minimal": []}
    for _ in range(repeats):
        times["launcher"].append(wall_time([*LAUNCHER, "--cfg", "job"], work, env))
        times["minimal"].append(wall_time([*MINIMAL_APP, "--cfg", "job"], work, env))
    return {name: median(values) for name, values in times.items()}


def heavy_imports(work: Path, args=("--cfg", "job")) -> list[str]:
    """Heavy modules `python -m launcher ARGS` imports (from `python -X importtime`)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", *args], cwd=work,
                            env=subprocess_env(), capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    return sorted(name for name in imported if name in HEAVY_MODULES)


def validate_sweep(work: Path) -> dict:
    """`task=validate` of an 8-point sweep: its wall time and the heavy modules it imports (the
    optimizer's and the schedule's signatures live in torch and transformers)."""
    args = ["-m", "task=validate", "optimizer.lr=" + ",".join(f"{i}e-4" for i in range(1, SWEEP_POINTS + 1))]
    wall = wall_time([*LAUNCHER, *args], work, subprocess_env())
    return {"wall_s": wall, "heavy_imports": heavy_imports(work, args)}


def time_to_first_step(overrides: list[str], work: Path, cache: Path) -> dict:
    """A one-step run: the task's own `time_to_first_step_s`, and the process wall time."""
    out = work / f"first-step-{time.monotonic_ns()}"
    env = subprocess_env(HYDRALM_CACHE=str(cache))
    wall = wall_time([*LAUNCHER, *overrides, "train.max_steps=1", f"output_dir={out}"], work, env)
    summary = json.loads((out / "summary.json").read_text())
    return {"task_to_first_step_s": summary["time_to_first_step_s"], "process_wall_s": wall}


def slurm_submission_time(work: Path) -> float:
    """Seconds from `python -m launcher -m ...` to its `sbatch` call for an 8-point sweep.

    The stand-in sbatch cannot run the jobs, so the launcher is stopped once it has submitted.
    """
    bin_dir = work / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for name, script in (("sbatch", FAKE_SBATCH), ("sinfo", FAKE_SINFO), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    marker = work / "submitted-at"
    marker.unlink(missing_ok=True)
    lrs = ",".join(f"{i}e-4" for i in range(1, SWEEP_POINTS + 1))
    env = subprocess_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HYDRALM_BENCH_SUBMITTED=str(marker))
    cmd = [*LAUNCHER, "-m", "hydra/launcher=submitit_slurm", f"optimizer.lr={lrs}",
           f"hydra.sweep.dir={work / 'sweep'}"]
    start = time.time()
    child = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        while not (marker.exists() and marker.read_text().strip()):
            if child.poll() is not None:
                sys.exit(f"the sweep exited before submitting:\n{child.stderr.read()[-4000:]}")
            time.sleep(0.05)
        return float(marker.read_text()) - start
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)  # our own child's session only
        child.wait()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one run of each; a tiny 1-step train run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating --cfg job runs of each app")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    with tempfile.TemporaryDirectory(prefix="hydralm-startup-") as tmp:
        work = Path(tmp)
        cfg_job = cfg_job_times(repeats, work)
        heavy = heavy_imports(work)
        if args.smoke:  # a tiny model, the shared cache: checks the code path only
            tiny = ["model.config.num_hidden_layers=1", "train.max_seq_len=32", "train.max_eval_batches=1"]
            first_step = {"warm cache": time_to_first_step(tiny, work, Path(os.environ.get(
                "HYDRALM_CACHE", work / "cache")))}
        else:  # the default run, with an empty preprocessing cache and then with the cache filled
            cache = work / "cache"
            first_step = {"cold cache": time_to_first_step([], work, cache),
                          "warm cache": time_to_first_step([], work, cache)}
        validate = validate_sweep(work)
        submission = slurm_submission_time(work)
    ratio = cfg_job["launcher"] / cfg_job["minimal"]
    print(f"startup (median of {repeats} alternating runs each)")
    print(f"  python -m launcher --cfg job:        {cfg_job['launcher']:6.2f} s")
    print(f"  minimal @hydra.main --cfg job:       {cfg_job['minimal']:6.2f} s")
    print(f"  heavy modules imported by --cfg job: {', '.join(heavy) or 'none'}")
    for label, times in first_step.items():
        print(f"  first optimizer step, default run ({label}): {times['task_to_first_step_s']:.2f} s from the "
              f"task's start; whole 1-step run {times['process_wall_s']:.2f} s wall")
    print(f"  {SWEEP_POINTS}-point sweep checked by task=validate: {validate['wall_s']:.2f} s "
          f"(imports {', '.join(validate['heavy_imports']) or 'nothing heavy'})")
    print(f"  {SWEEP_POINTS}-point sweep submitted to SLURM (launcher start -> sbatch): {submission:.2f} s")
    result = {"cfg_job_s": cfg_job, "heavy_imports": heavy, "first_step": first_step, "validate_sweep": validate,
              "slurm_submission_s": submission, "ratio": ratio}
    return publish(result, args.json, {"cfg-job/minimal-hydra": ratio})


if __name__ == "__main__":
    main()
