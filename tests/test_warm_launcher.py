"""The suite's warm `python -m launcher` (tests/warm_launcher.py) behaves as a fresh interpreter:
the same weights, output and exit codes, a SIGKILL seen as one; a run in another environment
starts cold."""

import pytest
from conftest import QUICK, WarmLauncher, assert_same_weights, final_weights, run_launcher, run_launcher_killed_in_save

pytestmark = pytest.mark.slow

COLD = {"HYDRALM_TEST_COLD": "1"}  # another environment: a fresh interpreter


def test_a_warm_run_equals_a_fresh_interpreters_run(tmp_path):
    args = [*QUICK, "train.max_seq_len=64", "data.train_bs=2"]
    warm = run_launcher([*args, f"output_dir={tmp_path / 'warm'}"], tmp_path)
    assert WarmLauncher.server is not None and WarmLauncher.server.ready
    cold = run_launcher([*args, f"output_dir={tmp_path / 'cold'}"], tmp_path, env=COLD)
    assert warm.returncode == cold.returncode == 0, warm.stderr[-2000:] + cold.stderr[-2000:]
    assert_same_weights(final_weights(tmp_path / "warm"), final_weights(tmp_path / "cold"))
    losses = [[line for line in run.stdout.splitlines() if "loss" in line and "step" in line] for run in (warm, cold)]
    assert losses[0] and [line.split(", ")[0] for line in losses[0]] == [line.split(", ")[0] for line in losses[1]]
    assert (tmp_path / "warm" / "hydralm.log").read_text().count("eval loss") > 0


def test_errors_exits_and_kills_are_a_fresh_interpreters(tmp_path):
    typo = ["train.max_stepz=2", f"output_dir={tmp_path / 'typo'}"]
    warm, cold = run_launcher(typo, tmp_path), run_launcher(typo, tmp_path, env=COLD)
    assert warm.returncode == cold.returncode == 2
    assert warm.stderr.strip() == cold.stderr.strip() and warm.stderr.startswith("hydralm: error: train.max_stepz")
    killed = run_launcher_killed_in_save(2, [*QUICK, "train.checkpointing_enabled=true", "train.save_steps=2",
                                             f"output_dir={tmp_path / 'killed'}"], tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final-model").exists()
