"""The benchmarks' code paths, in their tiny --smoke modes. Benchmarks are not tests: no timing
is asserted here, only that each script runs and prints the figures it promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


SLURM_COMMANDS = {"srun", "sbatch", "sinfo", "squeue", "scancel", "scontrol", "salloc", "sacct", "sattach"}


def _run(args, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _without_slurm(tmp_path: Path) -> dict:
    """The environment of a machine without SLURM: every command on PATH but SLURM's, linked
    into one folder that becomes the whole PATH."""
    commands = tmp_path / "bin"
    commands.mkdir()
    for folder in filter(os.path.isdir, os.environ["PATH"].split(os.pathsep)):
        for entry in os.scandir(folder):
            link = commands / entry.name
            if entry.name not in SLURM_COMMANDS and not os.path.lexists(link) and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return {**os.environ, "PATH": str(commands)}


def _ratio(stdout: str, name: str) -> float:
    match = re.search(rf"^ratio {re.escape(name)}: ([0-9.]+)$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


def test_cpu_benchmarks_print_their_ratio_lines_and_one_summary(tmp_path):
    """Also on a machine without SLURM: the submission benchmark brings its own stand-ins."""
    result = _run(["-m", "bench", "--smoke"], env=_without_slurm(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for name in ("hydralm/trainer", "hydralm/bare", "cfg-job/minimal-hydra"):
        assert _ratio(out, name) > 0
    summary = out[out.index("\nsummary"):]
    assert "ratio hydralm/trainer" in summary and "8-point SLURM sweep submission s" in summary
    assert re.search(r"heavy imports in --cfg job\s+none", summary), summary


def test_checksum_benchmark_prints_its_ratio_line():
    result = _run(["bench/checksums.py", "--smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _ratio(result.stdout, "save-with-checksums/plain") > 0
    assert re.search(r"verification \(page cache\): +[0-9.]+ s/GiB", result.stdout), result.stdout


def test_memory_benchmark_prints_each_figure_and_a_verdict():
    result = _run(["bench/memory.py", "--smoke"])
    assert result.returncode == 0, result.stderr[-8000:]  # a failed run: each rank's ending and log
    out = result.stdout
    for figure in ("runtime baseline", "loading (export of model.path), low_cpu_mem_usage=true: peak rank 0",
                   "training, 2 steps + checkpoint, low_cpu_mem_usage=true: peak rank 0", "summary.json:",
                   "checkpoint (model + AdamW state, 2 ranks):", "export of the 2-rank checkpoint: rank 0 peak"):
        assert figure in out, out
    assert re.search(r"^verdict: (PASS|FAIL) \(smoke", out, re.MULTILINE), out
