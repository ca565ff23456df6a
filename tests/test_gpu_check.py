"""bench/gpu_check.py, the GPU checklist, on a machine without a GPU: its --smoke mode runs every
item CPU can (each in its own process, with its peers) and writes one JSON; the runner records a
failing item and kills a hanging one; without --smoke it says it needs CUDA."""

import json
from pathlib import Path

import pytest
import torch
from test_bench_smoke import _ratio, _run

pytestmark = pytest.mark.slow


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_check_without_cuda_says_so():
    result = _run(["bench/gpu_check.py"], timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
