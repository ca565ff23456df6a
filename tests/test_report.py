"""Reports: a real 2-point sweep (logged to offline wandb, grouped) rendered as PNGs and a table;
a 24-run sweep and an Optuna study (maximising a DPO-style metric) written here as run directories."""

import json
import math
import subprocess
from pathlib import Path
import sys

import numpy as np
import optuna
import pytest
import yaml
from conftest import ROOT, compose_config, run_launcher
from PIL import Image
from wandb_records import offline_run

from launcher.cli.app import run_task
from launcher.cli.report import BEST_MARK, run_colours, write_report
from launcher.errors import ConfigError


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    sweep_dir = root / "sweep"
    shortest = ["train.max_steps=2", "train.logging_steps=1", "train.max_eval_batches=1"]
    result = run_launcher(["-m", "optimizer.lr=1e-3,1e-2", "logger=wandb", *shortest, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=root, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    return sweep_dir


def _assert_plot(path, min_coloured=200):
    with Image.open(path) as image:
        image.verify()  # a well-formed PNG
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 200  # the legend sits beside the axes
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # axes, lines, text: not a blank canvas
    coloured = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 60
    assert coloured.sum() > min_coloured  # the runs' coloured lines (or points) were drawn


@pytest.mark.slow
def test_sweep_runs_share_a_wandb_group_named_after_the_sweep(sweep):
    runs = [offline_run(sweep / point) for point in ("0", "1")]
    assert {r["run"].run_group for r in runs} == {str(sweep)}
    # named by their overrides (Hydra writes the swept values normalised: 1e-3 -> 0.001)
    assert "optimizer.lr=0.001" in runs[0]["run"].display_name and "optimizer.lr=0.01" in runs[1]["run"].display_name
    assert runs[0]["run"].run_id != runs[1]["run"].run_id


@pytest.mark.slow
def test_report_task_plots_and_tables_a_sweep(sweep, tmp_path):
    # task=report needs no model: a model whose weights are absent does not block it.
    cfg = compose_config(["task=report", f"report.dir={sweep}", "model=mistral_7b"])
    result = run_task(cfg)
    out = sweep / "report"
    assert sorted(p.name for p in out.iterdir()) == ["grad_norm.png", "loss.png", "lr.png", "objective.png", "report.md",
                                                     "tokens_per_s.png"]
    for plot in result["plots"]:
        _assert_plot(plot, min_coloured=50 if plot.endswith("objective.png") else 200)  # 2 points, or lines

    table = (out / "report.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | optimizer.lr | final eval_loss |")
    rows = {line.split(" | ")[1]: line for line in lines[2:]}  # after the header and the --- line
    assert set(rows) == {"0.001", "0.01"}
    assert sum(BEST_MARK in line for line in rows.values()) == 1
    losses = {lr: float(line.split(" | ")[2]) for lr, line in rows.items()}
    assert BEST_MARK in rows[min(losses, key=losses.get)]
    assert result["best_run"] in ("0", "1")
    for name in ("0", "1"):  # the schedule rebuilt from each run's config gives the lr its training logged
        logged = {row["step"]: row["lr"] for row in map(json.loads, (sweep / name / "metrics.jsonl").read_text().splitlines())
                  if "train_loss" in row}
        assert logged and {step: result["lr_per_step"][name][step - 1] for step in logged} == logged


@pytest.mark.slow
def test_report_cli_on_a_single_run(sweep, tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher.cli.report", str(sweep / "1"), "--out", str(tmp_path)],
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


def _write_run(run_dir, overrides, rows, final_eval, objective="eval_loss", job_num=None, direction=None,
               config=None, steps=None):
    """A run directory as hydralm and Hydra leave it."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"objective": objective, **(config or {})}))
    hydra = {"job": {"num": job_num}, **({"sweeper": {"direction": direction}} if direction else {})}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    (run_dir / "summary.json").write_text(json.dumps({"final_eval": final_eval, "tokens_per_s": 1000.0,
                                                      "train_wall_time_s": 2.0, **({"steps": steps} if steps else {})}))


def _curve(final_loss, lr, steps=4):
    rows = []
    for step in range(1, steps + 1):
        loss = 8.0 - (8.0 - final_loss) * step / steps
        rows += [{"step": step, "train_loss": loss + 0.05, "lr": lr * (1 - step / (steps + 1)), "tokens_seen": 512 * step,
                  "tokens_per_s": 900.0 + 50 * step + 1e4 * lr, "time_s": 0.5 * step, "grad_norm": 2.0 / step + 100 * lr},
                 {"step": step, "eval_loss": loss, "tokens_seen": 512 * step}]
    return rows


@pytest.mark.slow
def test_a_24_run_sweep_has_distinct_colours_one_best_run_and_a_plot_per_swept_key(tmp_path):
    sweep = tmp_path / "sweep"
    lrs, warmups = ["3e-4", "1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2"], ["0.0", "0.1", "0.2", "0.4"]
    losses = {}
    for i, (lr, warmup) in enumerate((lr, w) for lr in lrs for w in warmups):
        losses[str(i)] = 6.0 + abs(np.log10(float(lr)) + 2.5) + float(warmup) / 3  # unique minimum: lr 4e-3, warmup 0
        _write_run(sweep / str(i), [f"optimizer.lr={lr}", f"scheduler.warmup_ratio={warmup}", "train.max_steps=4"],
                   _curve(losses[str(i)], float(lr)), {"eval_loss": losses[str(i)]}, job_num=i)
    result = write_report(sweep)
    out = sweep / "report"
    assert sorted(p.name for p in out.iterdir()) == ["grad_norm.png", "loss.png", "lr.png", "objective.png", "report.md",
                                                     "tokens_per_s.png"]
    for plot in result["plots"]:
        _assert_plot(plot)

    colours = list(result["colours"].values())
    assert len(colours) == 24 and len(set(colours)) == 24  # none repeats
    best = min(losses, key=losses.get)
    assert result["best_run"] == best == "12"
    text = (out / "report.md").read_text()
    assert "Best: run 12, " in text and "`optimizer.lr=0.004`, `scheduler.warmup_ratio=0`" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| run | optimizer.lr | scheduler.warmup_ratio | final eval_loss | steps | tokens | tokens/s "
                        "| wall time (s) |  |")
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert list(rows) == [str(i) for i in range(24)]
    assert [name for name, line in rows.items() if BEST_MARK in line] == [best]
    assert all(abs(float(line.split(" | ")[3]) - losses[name]) < 1e-4 for name, line in rows.items())


def test_colours_stay_distinct_up_to_60_runs():
    for count in (1, 10, 11, 24, 60):
        assert len(set(run_colours(count))) == count


@pytest.mark.slow
def test_an_optuna_study_that_maximises_a_task_metric(tmp_path):
    """A DPO-style search: objective=eval_reward_accuracy, direction maximize, one failed trial."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(study_name="hydralm", storage=f"sqlite:///{sweep / 'optuna.db'}", direction="maximize")
    accuracies = {0: 0.55, 1: 0.70, 2: None, 3: 0.62, 4: 0.81}  # trial 2 failed
    for number, accuracy in accuracies.items():
        trial = study.ask()
        lr = trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)
        if accuracy is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, accuracy)
        _write_run(sweep / str(number), [f"optimizer.lr={lr}", "hparams_search=dpo"], _curve(1.0 - accuracy, lr),
                   {"eval_loss": 1.0 - accuracy, "eval_reward_accuracy": accuracy},
                   objective="eval_reward_accuracy", job_num=number, direction="maximize")
    result = write_report(sweep)
    assert result["best_run"] == "4" and result["study"]["best_trial"] == 4
    assert result["study"]["best_value"] == 0.81 and result["study"]["direction"] == "maximize"
    assert (sweep / "report" / "optuna_history.png").is_file()
    _assert_plot(sweep / "report" / "optuna_history.png")
    text = (sweep / "report" / "report.md").read_text()
    assert "Objective: final eval_reward_accuracy (maximized). Best: run 4, 0.8100" in text
    section = text.split("## Optuna study `hydralm` (maximize)")[1]
    assert "5 trials: 4 complete, 1 fail." in section and "Best: trial 4, final eval_reward_accuracy 0.8100" in section
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0][:4] == ["| trial", "state", "final eval_reward_accuracy", "best so far"]
    assert [(r[0][2:], r[1], r[2], r[3]) for r in rows[1:]] == [
        ("0", "complete", "0.5500", "0.5500"), ("1", "complete", "0.7000", "0.7000"), ("2", "fail", "", "0.7000"),
        ("3", "complete", "0.6200", "0.7000"), ("4", "complete", "0.8100", "0.8100")]
    assert rows[5][-1].rstrip(" |") == f"4 {BEST_MARK}" and rows[3][-1].rstrip(" |") == ""


def test_lr_is_drawn_at_every_step_from_the_runs_schedule(tmp_path):
    """A cosine with warmup logged every 5 steps: the report's lr of each of the 20 steps is the
    schedule's (hydralm's documented shift: step s trains with s/(W+1) of the peak in the
    warmup, then the cosine of step s-1), not a line between logged points."""
    lr, steps, warmup = 1e-3, 20, 2  # warmup_ratio 0.1 of 20 steps

    def reference(step):
        if step <= warmup:
            return lr * step / (warmup + 1)
        return lr * 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup)))

    rows = [{"step": s, "train_loss": 5.0, "lr": reference(s), "grad_norm": 1.0, "tokens_seen": 64 * s}
            for s in range(5, steps + 1, 5)]
    config = {"optimizer": {"_target_": "torch.optim.AdamW", "lr": lr}, "train": {"max_steps": steps},
              "scheduler": {"name": "cosine", "warmup_ratio": 0.1, "kwargs": {}}}
    _write_run(tmp_path / "run", [], rows, {"eval_loss": 5.0}, config=config, steps=steps)
    result = write_report(tmp_path / "run")
    assert result["lr_per_step"]["."] == pytest.approx([reference(s) for s in range(1, steps + 1)], rel=1e-9)
    for name in ("lr.png", "grad_norm.png"):
        _assert_plot(tmp_path / "run" / "report" / name, min_coloured=50)


def test_an_eval_driven_schedule_draws_only_the_logged_lr(tmp_path):
    config = {"optimizer": {"lr": 1e-3}, "train": {"max_steps": 4},
              "scheduler": {"name": "plateau_with_warmup", "warmup_ratio": 0.0, "kwargs": {}}}
    _write_run(tmp_path / "run", [], _curve(5.0, 1e-3), {"eval_loss": 5.0}, config=config, steps=4)
    assert write_report(tmp_path / "run")["lr_per_step"] == {".": None}


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_two_parameter_optuna_search_gets_importance_and_contour_plots_and_log_axes(tmp_path):
    """lr searched with log=True over less than a decade (a grid's >= 10x rule would not make
    it log), warmup on a linear scale; the objective depends mostly on the lr."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(study_name="hydralm", storage=f"sqlite:///{sweep / 'optuna.db'}",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for number in range(12):
        trial = study.ask()
        lr = trial.suggest_float("optimizer.lr", 1e-3, 5e-3, log=True)
        warmup = trial.suggest_float("scheduler.warmup_ratio", 0.0, 0.3)
        loss = 5.0 + 100 * abs(lr - 2.5e-3) + 0.01 * warmup
        study.tell(trial, loss)
        _write_run(sweep / str(number), [f"optimizer.lr={lr}", f"scheduler.warmup_ratio={warmup}"], _curve(loss, lr),
                   {"eval_loss": loss}, job_num=number, direction="minimize")
    result = write_report(sweep)
    names = [Path(p).name for p in result["plots"]]
    assert names[-3:] == ["optuna_history.png", "optuna_importance.png", "optuna_contour.png"]
    for plot in result["plots"]:
        _assert_plot(plot, min_coloured=50)
    assert result["log_axes"] == ["optimizer.lr"]
    importances = result["study"]["importances"]
    assert set(importances) == {"optimizer.lr", "scheduler.warmup_ratio"} and sum(importances.values()) == pytest.approx(1)
    assert importances["optimizer.lr"] > importances["scheduler.warmup_ratio"]


def test_a_sweepers_tag_log_marks_a_log_axis():
    from launcher.cli.report import Run, log_scale_keys

    run = Run("0", [], search_space={"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "train.seed": "range(1, 4)"})
    assert log_scale_keys([run], None) == {"optimizer.lr"}
