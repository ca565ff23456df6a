"""Reports: a real 2-point sweep (logged to offline wandb, grouped) rendered as PNGs and a table."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, compose_config, run_launcher
from launcher.app import run_task
from launcher.errors import ConfigError
from launcher.report import BEST_MARK
from wandb_records import offline_run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sweep_dir = root / "sweep"
    shortest = ["train.max_steps=2", "train.logging_steps=1", "train.max_eval_batches=1"]
    result = run_launcher(["-m", "optimizer.lr=1e-3,1e-2", "logger=wandb", *shortest, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=root, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    return sweep_dir


def _assert_plot(path):
    with Image.open(path) as image:
        image.verify()  # a well-formed PNG
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 450)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # axes, lines, text: not a blank canvas
    coloured = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 60
    assert coloured.sum() > 200  # the runs' coloured lines were drawn


def test_sweep_runs_share_a_wandb_group_named_after_the_sweep(sweep):
    runs = [offline_run(sweep / point) for point in ("0", "1")]
    assert {r["run"].run_group for r in runs} == {str(sweep)}
    # named by their overrides (Hydra writes the swept values normalised: 1e-3 -> 0.001)
    assert "optimizer.lr=0.001" in runs[0]["run"].display_name and "optimizer.lr=0.01" in runs[1]["run"].display_name
    assert runs[0]["run"].run_id != runs[1]["run"].run_id


def test_report_task_plots_and_tables_a_sweep(sweep, tmp_path):
    # task=report needs no model: a model whose weights are absent does not block it.
    cfg = compose_config(["task=report", f"report.dir={sweep}", "model=mistral_7b"])
    result = run_task(cfg)
    out = sweep / "report"
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "lr.png", "report.md", "tokens_per_s.png"]
    for plot in result["plots"]:
        _assert_plot(plot)

    table = (out / "report.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | optimizer.lr | final eval loss |")
    rows = {line.split(" | ")[1]: line for line in lines[2:]}  # after the header and the --- line
    assert set(rows) == {"0.001", "0.01"}
    assert sum(BEST_MARK in line for line in rows.values()) == 1
    losses = {lr: float(line.split(" | ")[2]) for lr, line in rows.items()}
    assert BEST_MARK in rows[min(losses, key=losses.get)]
    assert result["best_run"] in ("0", "1")


def test_report_cli_on_a_single_run(sweep, tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher.report", str(sweep / "1"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    header, _, row = result.stdout.splitlines()[:3]
    assert "| optimizer.lr |" in header and "| train.max_steps |" in header  # one run: all its overrides
    assert row.startswith("| . | ") and BEST_MARK not in row
    _assert_plot(tmp_path / "loss.png")


def test_report_of_a_directory_without_runs_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no metrics.jsonl"):
        run_task(compose_config(["task=report", f"report.dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="report.dir must be set"):
        run_task(compose_config(["task=report"]))
