"""The suite's warm `python -m launcher` (tests/warm_launcher.py) behaves as a fresh interpreter:
the same weights, output and exit codes, a SIGKILL seen as one; a run whose environment differs in
what imports read starts cold."""

import pytest
from conftest import QUICK, assert_same_weights, final_weights, run_launcher, run_launcher_killed_in_save
from warm_launcher import WarmLauncher

pytestmark = pytest.mark.slow


def cold(monkeypatch, *args, **kwargs):
    """run_launcher in a fresh interpreter."""
    with monkeypatch.context() as patch:
        patch.setenv("HYDRALM_TEST_COLD", "1")
        return run_launcher(*args, **kwargs)


def test_a_warm_run_equals_a_fresh_interpreters_run(tmp_path, monkeypatch):
    args = [*QUICK, "train.max_seq_len=64", "data.train_bs=2"]
    warm_runs = WarmLauncher.counts["warm"]
    warm = run_launcher([*args, f"output_dir={tmp_path / 'warm'}"], tmp_path, env={"WANDB_MODE": "disabled"})
    assert WarmLauncher.counts["warm"] == warm_runs + 1  # a RUNTIME_ONLY variable may differ
    cold_run = cold(monkeypatch, [*args, f"output_dir={tmp_path / 'cold'}"], tmp_path, env={"WANDB_MODE": "disabled"})
    assert warm.returncode == cold_run.returncode == 0, warm.stderr[-2000:] + cold_run.stderr[-2000:]
    assert_same_weights(final_weights(tmp_path / "warm"), final_weights(tmp_path / "cold"))
    losses = [[line for line in run.stdout.splitlines() if "loss" in line and "step" in line] for run in (warm, cold_run)]
    assert losses[0] and [line.split(", ")[0] for line in losses[0]] == [line.split(", ")[0] for line in losses[1]]
    assert (tmp_path / "warm" / "hydralm.log").read_text().count("eval loss") > 0


def test_errors_exits_and_kills_are_a_fresh_interpreters(tmp_path, monkeypatch):
    typo = ["train.max_stepz=2", f"output_dir={tmp_path / 'typo'}"]
    warm, cold_run = run_launcher(typo, tmp_path), cold(monkeypatch, typo, tmp_path)
    assert warm.returncode == cold_run.returncode == 2
    assert warm.stderr.strip() == cold_run.stderr.strip() and warm.stderr.startswith("hydralm: error: train.max_stepz")
    killed = run_launcher_killed_in_save(2, [*QUICK, "train.checkpointing_enabled=true", "train.save_steps=2",
                                             f"output_dir={tmp_path / 'killed'}"], tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final-model").exists()


def test_a_run_with_another_import_time_environment_starts_cold(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported: the server's value would win."""
    cold_runs = sum(count for how, count in WarmLauncher.counts.items() if how.startswith("cold (HF_HUB_OFFLINE"))
    result = run_launcher(["task=validate"], tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert WarmLauncher.counts["cold (HF_HUB_OFFLINE)"] == cold_runs + 1
