"""Optuna search with the local launcher: `hparams_search=lr_warmup` runs trials, each job hands
the sweeper its final eval loss as a float, the study lives in the sweep directory and the same
command continues it in new run directories. (The SLURM side is in test_slurm.py.)"""

import json
import math

import optuna
import pytest
import yaml
from conftest import assert_rejected_before_any_work, compose_config, run_launcher
from omegaconf import OmegaConf

from launcher.errors import ConfigError
from launcher.training.objective import check_objective, objective_value

TINY = ["train.max_steps=2", "train.logging_steps=2", "train.max_eval_batches=1", "train.max_seq_len=64",
        "data.train_bs=4"]


def search(sweep_dir, cwd, *extra):
    return run_launcher(["hparams_search=lr_warmup", "hydra.sweeper.n_trials=2", *TINY, *extra,
                         f"hydra.sweep.dir={sweep_dir}"], cwd=cwd, timeout=300)


def load(sweep_dir):
    return optuna.load_study(study_name="hydralm", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


@pytest.fixture(scope="module")
def continued_search(tmp_path_factory):
    """2 trials, then the same command again."""
    root = tmp_path_factory.mktemp("optuna")
    sweep_dir = root / "search"
    first = search(sweep_dir, root)
    assert first.returncode == 0, first.stderr[-4000:]
    assert len(load(sweep_dir).trials) == 2
    second = search(sweep_dir, root)
    assert second.returncode == 0, second.stderr[-4000:]
    return sweep_dir


@pytest.mark.slow
def test_the_same_command_adds_trials_to_the_study_in_new_run_directories(continued_search):
    trials = load(continued_search).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({(t.params["optimizer.lr"], t.params["scheduler.warmup_ratio"]) for t in trials}) == 4
    for trial in trials:
        run = continued_search / str(trial.number)
        # the run directory of trial N is job N, holding that trial's values
        assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.job.num == trial.number
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert math.isclose(config.optimizer.lr, trial.params["optimizer.lr"], rel_tol=1e-12)
        assert math.isclose(config.scheduler.warmup_ratio, trial.params["scheduler.warmup_ratio"], rel_tol=1e-12)
        assert 1e-4 <= trial.params["optimizer.lr"] <= 1e-2 and 0.0 <= trial.params["scheduler.warmup_ratio"] <= 0.2
        # the float the job handed the sweeper is that run's final eval loss (its last eval row)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert trial.value == [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
        assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert sorted(p.name for p in continued_search.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_the_report_lists_the_trials_best_parameters_and_history(continued_search, tmp_path):
    from launcher.cli.report import BEST_MARK, write_report

    result = write_report(continued_search, tmp_path)
    trials = load(continued_search).trials
    best = min(trials, key=lambda t: t.value)
    assert result["study"]["best_trial"] == best.number and result["study"]["best_params"] == best.params
    assert result["best_run"] == str(best.number)
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Optuna study `hydralm` (minimize)")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1", "| 2", "| 3"]
    best_so_far = [float(row.split(" | ")[3]) for row in rows]
    assert best_so_far == [round(min(t.value for t in trials[: i + 1]), 4) for i in range(4)]
    assert sum(BEST_MARK in row for row in rows) == 1 and BEST_MARK in rows[best.number]
    assert (tmp_path / "optuna_history.png").is_file() and (tmp_path / "objective.png").is_file()


@pytest.mark.slow
def test_another_search_in_the_same_sweep_dir_is_refused(continued_search, tmp_path):
    result = search(continued_search, tmp_path, "train.seed=5")
    assert result.returncode == 2
    message = [line for line in result.stderr.splitlines() if line.startswith("hydralm: error:")]
    assert message == [f"hydralm: error: hydra.sweep.dir={continued_search} holds the Optuna study of another search "
                       "(train.seed: not set in the study, 5 now); run the study's own command to continue it, or "
                       "give a new hydra.sweep.dir"], result.stderr
    assert len(load(continued_search).trials) == 4


@pytest.mark.slow
def test_a_new_study_refuses_a_sweep_dir_that_holds_runs(tmp_path):
    (tmp_path / "sweep" / "0" / ".hydra").mkdir(parents=True)
    result = search(tmp_path / "sweep", tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"hydralm: error: hydra.sweep.dir={tmp_path / 'sweep'} already holds runs (0)" in result.stderr
    assert not (tmp_path / "sweep" / "optuna.db").exists()


def test_the_lora_search_tunes_rank_and_alpha():
    cfg = compose_config(["hparams_search=lora"])
    assert cfg.peft.name == "lora"
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=["hparams_search=lora"], return_hydra_config=True).hydra
    assert hydra_cfg.sweeper._target_ == "hydra_plugins.hydralm.optuna_sweeper.OptunaSearch"
    assert set(hydra_cfg.sweeper.params) == {"peft.r", "peft.lora_alpha"}
    assert hydra_cfg.mode.name == "MULTIRUN"


def test_objective_names_a_metric_of_the_final_evaluation():
    summary = {"final_eval_loss": 2.5, "final_eval": {"eval_loss": 2.5, "eval_reward_accuracy": 0.75}, "steps": 3}
    assert objective_value(OmegaConf.create({"objective": "eval_loss"}), summary) == 2.5
    # a task with its own metric (DPO's reward accuracy) names it
    dpo = OmegaConf.create({"objective": "eval_reward_accuracy"})
    check_objective(dpo, ("reward_accuracy", "reward_margin"))
    assert objective_value(dpo, summary) == 0.75 and isinstance(objective_value(dpo, summary), float)
    # task=evaluate's result is itself an evaluation; a report's result has no metric and stays as it is
    assert objective_value(OmegaConf.create({"objective": "eval_loss"}), {"eval_loss": 3.0, "perplexity": 20.1}) == 3.0
    report = {"report": "r.md", "table": ""}
    assert objective_value(OmegaConf.create({"objective": "eval_loss"}), report) is report
    with pytest.raises(ConfigError, match="objective='eval_accuracy' is not valid; choose one of: eval_loss$"):
        check_objective(OmegaConf.create({"objective": "eval_accuracy"}), ())


def test_an_objective_the_task_does_not_report_is_refused_before_any_work(tmp_path):
    assert_rejected_before_any_work(["objective=eval_acc"], "objective='eval_acc' is not valid; choose one of: eval_loss",
                                    tmp_path)


def test_objective_is_not_part_of_the_run_identity():
    from launcher.schema import RUN
    from launcher.store.identity import identity

    assert "objective" not in identity(compose_config(["objective=eval_loss"]), RUN)
    assert yaml.safe_load(OmegaConf.to_yaml(compose_config()))["objective"] == "eval_loss"
