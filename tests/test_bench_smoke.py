"""The benchmarks' code paths, in their tiny --smoke modes. Benchmarks are not tests: no timing
is asserted here, only that each script runs and prints the figures it promises."""

import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _ratio(stdout: str, name: str) -> float:
    match = re.search(rf"^ratio {re.escape(name)}: ([0-9.]+)$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


def test_cpu_benchmarks_print_their_ratio_lines_and_one_summary():
    result = _run(["-m", "bench", "--smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for name in ("hydralm/trainer", "hydralm/bare", "cfg-job/minimal-hydra"):
        assert _ratio(out, name) > 0
    summary = out[out.index("\nsummary"):]
    assert "ratio hydralm/trainer" in summary and "8-point SLURM sweep submission s" in summary
    assert re.search(r"heavy imports in --cfg job\s+none", summary), summary


def test_gpu_benchmark_runs_its_code_path_on_cpu_in_smoke_mode():
    result = _run(["bench/gpu_throughput.py", "--smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^sdpa\+ac\s+\d+", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_benchmark_without_cuda_says_so():
    result = _run(["bench/gpu_throughput.py"], timeout=120)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr


def test_memory_benchmark_prints_each_figure_and_a_verdict():
    result = _run(["bench/memory.py", "--smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for figure in ("runtime baseline", "loading (export of model.path), low_cpu_mem_usage=true: peak rank 0",
                   "training, 2 steps + checkpoint, low_cpu_mem_usage=true: peak rank 0", "summary.json:",
                   "checkpoint (model + AdamW state, 2 ranks):", "export of the 2-rank checkpoint: rank 0 peak"):
        assert figure in out, out
    assert re.search(r"^verdict: (PASS|FAIL) \(smoke", out, re.MULTILINE), out
