"""train.max_steps raised on a finished run continues it from its latest checkpoint: the loss
rows continue, and with a constant schedule the final weights equal a run of the new length."""

import json
import math
from pathlib import Path

import pytest
from conftest import assert_same_weights, compose_config, final_weights

from launcher.cli.app import run_task
from launcher.cli.validate import check_config
from launcher.errors import ConfigError

LR = 1e-3
SMALL = ["train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=1",
         "train.logging_steps=1", "train.checkpointing_enabled=true", "train.save_steps=2", f"optimizer.lr={LR}"]
STEPS = 4


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(output_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in rows(output_dir) if "train_loss" in row}


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_finished_constant_schedule_run_raised_to_twice_its_steps_equals_the_longer_run(tmp_path):
    common = [*SMALL, "scheduler=constant"]
    extended, direct = tmp_path / "extended", tmp_path / "direct"
    first = run_task(compose_config([*common, f"train.max_steps={STEPS}", f"output_dir={extended}"]))
    assert first["steps"] == STEPS
    before = train_rows(extended)

    summary = run_task(compose_config([*common, f"train.max_steps={2 * STEPS}", f"output_dir={extended}"]))
    assert summary["steps"] == 2 * STEPS and summary["resumed_at_step"] == STEPS
    after = train_rows(extended)
    assert sorted(after) == list(range(1, 2 * STEPS + 1))  # one row per step, the first run's kept
    assert all(after[step] == before[step] for step in before)

    run_task(compose_config([*common, f"train.max_steps={2 * STEPS}", f"output_dir={direct}"]))
    assert_same_weights(final_weights(extended), final_weights(direct))
    assert [after[s]["train_loss"] for s in after] == [train_rows(direct)[s]["train_loss"] for s in after]

    # The same command again: finished at this length, nothing to train.
    again = run_task(compose_config([*common, f"train.max_steps={2 * STEPS}", f"output_dir={extended}"]))
    assert again["steps"] == 2 * STEPS and again["final_eval_loss"] == summary["final_eval_loss"]


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_cosine_run_continued_takes_the_longer_schedules_lr_from_the_step_it_reached(tmp_path):
    """Documented: steps 1..N ran under the N-step cosine; from N+1 on the lr is the 2N-step
    cosine's at that step (transformers' get_cosine_schedule_with_warmup, no warmup: step s
    trains with lr * (1 + cos(pi * (s - 1) / total)) / 2)."""
    out = tmp_path / "run"
    run_task(compose_config([*SMALL, "scheduler=cosine", "scheduler.warmup_ratio=0", f"train.max_steps={STEPS}", f"output_dir={out}"]))
    run_task(compose_config([*SMALL, "scheduler=cosine", "scheduler.warmup_ratio=0", f"train.max_steps={2 * STEPS}", f"output_dir={out}"]))
    logged = train_rows(out)

    def cosine(step, total):
        return LR * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))

    expected = {s: cosine(s, STEPS) if s <= STEPS else cosine(s, 2 * STEPS) for s in range(1, 2 * STEPS + 1)}
    assert {s: row["lr"] for s, row in logged.items()} == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_finished_run_cannot_be_shortened(tmp_path):
    out = tmp_path / "run"
    run_task(compose_config([*SMALL, f"train.max_steps={STEPS}", f"output_dir={out}"]))
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    with pytest.raises(ConfigError) as err:
        check_config(compose_config([*SMALL, "train.max_steps=2", f"output_dir={out}"]))  # before any work
    assert str(err.value).startswith(f"train.max_steps=2 is below this finished run's train.max_steps={STEPS} "
                                     f"({STEPS} steps trained)")
    with pytest.raises(ConfigError, match="is below this finished run"):
        run_task(compose_config([*SMALL, "train.max_steps=2", f"output_dir={out}"]))
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before  # still finished, untouched
