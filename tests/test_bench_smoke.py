"""The benchmarks' code paths, in their tiny --smoke modes. Benchmarks are not tests: no timing
is asserted here, only that each script runs and prints the figures it promises."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def test_gpu_check_smoke_runs_every_item_cpu_can_and_writes_one_json(tmp_path):
    from bench.gpu_check import ITEMS, SCHEMA

    out = tmp_path / "check.json"
    result = _run(["bench/gpu_check.py", "--smoke", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA and report["mode"] == "smoke" and len(report["git_commit"]) == 40
    assert list(report["items"]) == [item.name for item in ITEMS]
    for item in ITEMS:  # skipped: only what needs CUDA or a key this schema lacks, and it says so
        entry = report["items"][item.name]
        expected = "skipped" if item.needs_cuda else "passed"
        assert entry["status"] == expected, (item.name, entry)
        if item.group == "throughput" and expected == "passed":
            assert entry["figures"]["tokens_per_s"] > 0 and entry["figures"]["mfu"] is None  # no peak on CPU
    environment = report["items"]["environment"]["figures"]
    assert environment["torch"] == torch.__version__ and environment["gpu"] is None
    packed = report["items"]["document_mask_equality"]["figures"]
    assert {"sdpa_float32_rel", "flex_attention_bfloat16_rel"} <= packed.keys()  # flex forward runs on CPU
    table = result.stdout[result.stdout.index("hydralm gpu check (smoke: figures mean nothing)"):]
    assert all(item.name in table for item in ITEMS) and str(out) in table
    for name in ("hydralm/bare", "hydralm/bare-compiled", "hydralm/trainer"):  # peers ran beside hydralm
        assert _ratio(result.stdout, name) == pytest.approx(report["ratios"][name], rel=1e-3)
    profile = report["items"]["profile"]["figures"]
    assert profile["profiled_item"] in [item.name for item in ITEMS] and len(profile["profile"]["top"]) > 0
    assert "aten::mm" in Path(profile["profile"]["text"]).read_text()  # the table, beside the JSON


def test_gpu_check_lists_its_default_set_in_order_within_the_budget():
    from bench.gpu_check import DEFAULT_BUDGET_S, ITEMS

    result = _run(["bench/gpu_check.py", "--list"], timeout=120)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:-1]]
    assert listed == [item.name for item in ITEMS if item.default]
    assert listed[:3] == ["environment", "throughput_1b_default", "peer_bare_fsdp2"]
    assert sum(item.estimate_s for item in ITEMS if item.default) <= DEFAULT_BUDGET_S


def test_gpu_check_records_a_failing_item_and_kills_a_hanging_one(tmp_path):
    import argparse

    from bench.gpu_check import ITEMS_BY_NAME, Runner, _run_item, _spec

    args = argparse.Namespace(smoke=True, peak_flops=None)
    runner = Runner(tmp_path)
    item = ITEMS_BY_NAME["throughput_1b_sdpa"]
    broken = runner.run(item, {"item": item.name, "smoke": True}, timeout=120)  # no shapes: KeyError
    assert broken["status"] == "error" and "KeyError" in broken["error_tail"], broken
    item = ITEMS_BY_NAME["mixed_precision"]
    hanging = runner.run(item, _spec(item, args, tmp_path), timeout=1)
    assert hanging["status"] == "timeout" and hanging["seconds"] < 30, hanging
    late = _run_item(item, args, runner, tmp_path, remaining=5)
    assert late["status"] == "skipped" and late["reason"].startswith("budget"), late
    big = ITEMS_BY_NAME["throughput_8b_bf16"]  # on a GPU, an item starts only if its estimate fits
    gpu = argparse.Namespace(smoke=False, peak_flops=None)
    unfit = _run_item(big, gpu, runner, tmp_path, remaining=big.estimate_s - 1)
    assert unfit["status"] == "skipped" and f"needs ~{big.estimate_s:.0f} s" in unfit["reason"], unfit


def test_checksum_benchmark_prints_its_ratio_line():
    result = _run(["bench/checksums.py", "--smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _ratio(result.stdout, "save-with-checksums/plain") > 0
    assert re.search(r"verification \(page cache\): +[0-9.]+ s/GiB", result.stdout), result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_check_without_cuda_says_so():
    result = _run(["bench/gpu_check.py"], timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr


def test_memory_benchmark_prints_each_figure_and_a_verdict():
    result = _run(["bench/memory.py", "--smoke"])
    assert result.returncode == 0, result.stderr[-8000:]  # a failed run: each rank's ending and log
    out = result.stdout
    for figure in ("runtime baseline", "loading (export of model.path), low_cpu_mem_usage=true: peak rank 0",
                   "training, 2 steps + checkpoint, low_cpu_mem_usage=true: peak rank 0", "summary.json:",
                   "checkpoint (model + AdamW state, 2 ranks):", "export of the 2-rank checkpoint: rank 0 peak"):
        assert figure in out, out
    assert re.search(r"^verdict: (PASS|FAIL) \(smoke", out, re.MULTILINE), out
