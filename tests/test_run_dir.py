"""The run directory at the start of a run: one run per directory (launcher/store/claim.py), its lock,
checkpoint names and pruning, and rows that are logged once.

Each refused case checks the one line it prints and that nothing in the old run's directory
changed, Hydra's `.hydra/` record and the job log included.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_rejected_before_any_work, compose_config, run_launcher
from safetensors.torch import load_file

from launcher.cli.app import run_task
from launcher.errors import ConfigError
from launcher.store.claim import LOCK_FILE, RunLock
from launcher.store.run_dir import checkpoint_dir, latest_checkpoint

TINY = ["train.max_seq_len=64", "data.eval_bs=4", "train.max_eval_batches=1"]
SMALL = [*TINY, "data.train_bs=2", "train.max_steps=4", "train.logging_steps=2"]
CHECKPOINTS = ["train.checkpointing_enabled=true", "train.save_steps=2"]


def checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"checkpoint-{step:08d}"


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def logged(output_dir: Path) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "eval_loss" in r) for r in rows]


class Killed(BaseException):
    """Stands in for SIGKILL inside a save (launcher/training/checkpoint.py's test hook), in-process: the
    disk is left as a kill leaves it (a .partial, rows up to the step), bar the stale run.lock."""


def run_killed_in_save(overrides, step: int, monkeypatch) -> None:
    """Killed (Killed raised) inside the save of `step`: shards and trainer state written, the
    checkpoint not yet complete (as tests/kill_in_save.py does with SIGKILL)."""
    from launcher.store import atomic

    commit = atomic.commit

    def commit_unless_killed(staging, target, *args, **kwargs):
        if Path(target).name == checkpoint_dir(Path(), step).name:
            raise Killed
        return commit(staging, target, *args, **kwargs)

    monkeypatch.setattr(atomic, "commit", commit_unless_killed)
    with pytest.raises(Killed):
        run_task(compose_config(overrides))
    monkeypatch.undo()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hydralm: error")]


def assert_one_line_refusal(result, *fragments) -> str:
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


# ---------------------------------------------------------------------- found cases of issue 12


@pytest.mark.slow
def test_a_sweep_into_one_output_dir_trains_the_first_point_and_refuses_the_second(tmp_path):
    out = tmp_path / "X"
    result = run_launcher(["-m", "optimizer.lr=1e-3,3e-3", f"output_dir={out}", *SMALL, *CHECKPOINTS,
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    line = assert_one_line_refusal(result, f"output_dir={out} holds another run (optimizer.lr=0.001 there, 0.003 now",
                                   "overwrite=true")
    assert "resume=never" in line
    assert "resuming" not in result.stdout  # point 1 did not continue point 0's checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_at_step"] is None
    assert logged(out) == [(0, True), (2, False), (2, True), (4, False), (4, True)]  # one curve
    state = json.loads((checkpoint(out, 4) / "trainer_state.json").read_text())
    assert state["fingerprint"]["optimizer.lr"] == 1e-3


@pytest.mark.slow
def test_a_rerun_with_another_config_is_refused_before_it_touches_the_old_run(tmp_path):
    out = tmp_path / "run"
    run_task(compose_config([*SMALL, *CHECKPOINTS, f"output_dir={out}"]))
    (out / ".hydra").mkdir()  # what `python -m launcher` would have left (written in-process to save a start)
    (out / ".hydra" / "config.yaml").write_text("optimizer:\n  lr: 0.002\n")
    (out / "hydralm.log").write_text("the first run's log\n")
    before = snapshot(out)

    result = run_launcher([*SMALL, *CHECKPOINTS, "optimizer.lr=3e-3", f"output_dir={out}"], cwd=tmp_path)
    assert_one_line_refusal(result, f"output_dir={out} holds another run (optimizer.lr=0.002 there, 0.003 now; it has "
                                    f"checkpoints up to step 4, metrics.jsonl, summary.json, final-model)",
                            "overwrite=true")
    assert snapshot(out) == before


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_rerun_into_a_finished_run_without_checkpoints_adds_no_curve_and_keeps_its_model(tmp_path):
    out = tmp_path / "run"
    first = run_task(compose_config([*SMALL, f"output_dir={out}"]))
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"holds another run \(optimizer.lr=0.002 there, 0.003 now"):
        run_task(compose_config([*SMALL, "optimizer.lr=3e-3", f"output_dir={out}"]))
    assert snapshot(out) == before
    # The same config again: the finished run's summary, nothing trained or written.
    again = run_task(compose_config([*TINY, "data.train_bs=2", "train.max_steps=4", "train.logging_steps=1",
                                     f"output_dir={out}"]))
    assert again == json.loads(json.dumps(first)) and snapshot(out) == before


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_overwrite_deletes_the_old_run_and_resume_never_refuses_naming_it(tmp_path):
    out = tmp_path / "run"
    run_task(compose_config([*SMALL, *CHECKPOINTS, f"output_dir={out}"]))
    (out / "wandb_run_id").write_text("old-run-id")
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"holds a run of this config \(checkpoints up to step 4, metrics.jsonl.*"
                                          r"resume=never does not start over"):
        run_task(compose_config([*SMALL, *CHECKPOINTS, "resume=never", f"output_dir={out}"]))
    with pytest.raises(ConfigError, match="overwrite=true would delete resume="):
        run_task(compose_config([*SMALL, "overwrite=true", f"resume={checkpoint(out, 2)}", f"output_dir={out}"]))
    assert snapshot(out) == before

    summary = run_task(compose_config([*SMALL, "optimizer.lr=3e-3", "train.max_steps=2", "overwrite=true",
                                       f"output_dir={out}"]))
    assert summary["steps"] == 2
    assert logged(out) == [(0, True), (2, False), (2, True)]
    assert not (out / "checkpoints").exists() and not (out / "wandb_run_id").exists()
    assert json.loads((out / "run.json").read_text())["identity"]["optimizer.lr"] == 3e-3
    assert load_file(out / "final-model" / "model.safetensors").keys()  # the new model, complete
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no trash left


# ---------------------------------------------------------------------- resume and the batch layout


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_an_explicit_resume_may_change_the_batch_layout_and_resume_auto_may_not(tmp_path):
    out = tmp_path / "run"
    run_task(compose_config([*SMALL, *CHECKPOINTS, "train.keep_last_n=3", f"output_dir={out}"]))
    # Resharded resume: half the rows per batch, twice the accumulation, from step 2.
    summary = run_task(compose_config([*TINY, *CHECKPOINTS, "train.max_steps=4", "train.logging_steps=2",
                                       "data.train_bs=1", "train.gradient_accumulation_steps=2",
                                       f"resume={checkpoint(out, 2)}", f"output_dir={out}"]))
    assert summary["resumed_at_step"] == 2 and summary["steps"] == 4
    assert logged(out) == [(0, True), (2, False), (2, True), (4, False), (4, True)]
    assert json.loads((out / "run.json").read_text())["identity"]["data.train_bs"] == 1
    with pytest.raises(ConfigError, match=r"holds another run \(data.train_bs=1 there, 2 now and 1 more key"):
        run_task(compose_config([*SMALL, *CHECKPOINTS, f"output_dir={out}"]))


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_checkpoint_of_another_run_is_refused_before_any_work(tmp_path):
    source = tmp_path / "source"
    run_task(compose_config([*SMALL, *CHECKPOINTS, f"output_dir={source}"]))
    assert_rejected_before_any_work([*SMALL, "optimizer.lr=3e-3", f"resume={checkpoint(source, 2)}"],
                                    "(optimizer.lr: 0.002 in the checkpoint, 0.003 now)", tmp_path)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_resuming_an_earlier_checkpoint_drops_the_later_ones_so_a_kill_resumes_the_new_branch(tmp_path, capsys,
                                                                                              monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, *CHECKPOINTS, "data.train_bs=2", "train.max_steps=6", "train.logging_steps=2",
            "train.keep_last_n=3", f"output_dir={out}"]
    run_task(compose_config(args))
    assert latest_checkpoint(out) == checkpoint(out, 6)
    capsys.readouterr()
    run_killed_in_save([*args, f"resume={checkpoint(out, 2)}"], 4, monkeypatch)
    assert "removed the later checkpoints it abandons: checkpoint-00000004, checkpoint-00000006" in capsys.readouterr().out
    assert latest_checkpoint(out) == checkpoint(out, 2)  # not the abandoned branch's step 6
    result = run_task(compose_config(args))
    assert result["resumed_at_step"] == 2 and result["steps"] == 6
    assert logged(out)[-2:] == [(6, False), (6, True)] and len(logged(out)) == 7


def test_checkpoints_are_ordered_by_step_past_eight_digits(tmp_path):
    from launcher.store.run_dir import TRAINER_STATE, complete_checkpoints

    for step in (99_999_999, 100_000_000):
        checkpoint(tmp_path, step).mkdir(parents=True)
        for name in ("COMPLETE", TRAINER_STATE):
            (checkpoint(tmp_path, step) / name).write_text("{}")
    assert complete_checkpoints(tmp_path) == [checkpoint(tmp_path, 99_999_999), checkpoint(tmp_path, 100_000_000)]


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_checkpoint_names_that_do_not_parse_are_ignored(tmp_path):
    out = tmp_path / "run"
    run_task(compose_config([*SMALL, *CHECKPOINTS, f"output_dir={out}"]))
    for done in ("summary.json", "final-model", "checkpoints/checkpoint-00000004"):  # as if killed after step 2's save
        shutil.rmtree(out / done) if (out / done).is_dir() else (out / done).unlink()
    copy = out / "checkpoints" / "checkpoint-00000008.bak"
    shutil.copytree(checkpoint(out, 2), copy)
    assert latest_checkpoint(out) == checkpoint(out, 2)
    # Resumes from step 2 (no int() of the copy's name), then prunes to 1 checkpoint around the copy.
    summary = run_task(compose_config([*SMALL, *CHECKPOINTS, "train.keep_last_n=1", f"output_dir={out}"]))
    assert summary["resumed_at_step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000004", copy.name]


# ---------------------------------------------------------------------- rows logged once, honest numbers


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_rerun_after_a_kill_before_the_first_checkpoint_logs_step_0_once(tmp_path, monkeypatch):
    out, reference = tmp_path / "run", tmp_path / "reference"
    args = [*SMALL, *CHECKPOINTS]
    run_killed_in_save([*args, f"output_dir={out}"], 2, monkeypatch)
    assert logged(out) == [(0, True), (2, False), (2, True)]
    assert latest_checkpoint(out) is None
    run_task(compose_config([*args, f"output_dir={out}"]))
    run_task(compose_config([*args, f"output_dir={reference}"]))
    assert logged(out) == logged(reference)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_after_a_resume_the_bar_starts_at_the_resumed_step_and_throughput_counts_this_process(tmp_path, capfd,
                                                                                              monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, *CHECKPOINTS, "data.train_bs=2", "train.logging_steps=3", "train.max_steps=6", f"output_dir={out}"]
    run_killed_in_save(args, 4, monkeypatch)
    monkeypatch.setattr("launcher.training.metrics.interactive_console", lambda: True)  # the tqdm bar, as on a terminal
    capfd.readouterr()
    summary = run_task(compose_config(args))
    bar = capfd.readouterr().err
    assert " 2/6 " in bar and " 0/6 " not in bar
    tokens_per_step = 2 * 64  # train_bs x max_seq_len: pydoc is fully packed
    assert summary["resumed_at_step"] == 2
    assert summary["process_tokens"] == 4 * tokens_per_step and summary["tokens_seen"] == 6 * tokens_per_step
    assert summary["tokens_per_s"] == pytest.approx(summary["process_tokens"] / summary["train_wall_time_s"])
    # The first row after the resume covers steps 1-3; steps 1-2 were the killed process's work.
    first = next(json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in r)
    assert first["step"] == 3 and first["tokens_seen"] == 3 * tokens_per_step
    assert first["tokens_per_s"] * first["time_s"] == pytest.approx(tokens_per_step, rel=0.2)


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_one_step_run_trains_at_a_non_zero_lr(tmp_path):
    out = tmp_path / "run"
    summary = run_task(compose_config([*TINY, "data.train_bs=2", "train.max_steps=1", "train.logging_steps=1",
                                       f"output_dir={out}"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "train_loss" in r)
    assert train_row["lr"] == pytest.approx(2e-3)  # conf/optimizer/adamw.yaml's peak: the warmup is not the whole run
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.01


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_throughput_counts_input_tokens_of_a_prompt_masked_dataset(tmp_path):
    from transformers import AutoTokenizer

    prompts = [f"Question {i}: what does the helper function number {i} of the module return when called?"
               for i in range(9)]
    answers = [f"{i}" for i in range(9)]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": f"{p} ### {a}"}) + "\n" for p, a in zip(prompts[:8], answers)))
    evaluation.write_text(json.dumps({"text": f"{prompts[8]} ### 8"}) + "\n")
    cfg = compose_config([*TINY, "data.train_bs=2", "train.epochs=1", "data=files", f"data.load_path={train}",
                          f"data.eval_split={evaluation}", "data.separator='###'", f"output_dir={tmp_path / 'run'}"])
    summary = run_task(cfg)

    # Independent count: the prompt (through the separator) and the answer tokenized apart, plus BOS and EOS.
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    inputs = sum(count(f"{p} ###") + count(f" {a}") + 2 for p, a in zip(prompts[:8], answers))
    labels_at_most = sum(count(f" {a}") + 1 for a in answers[:8])
    assert summary["steps"] == 4 and summary["tokens_seen"] == inputs
    assert 0 < summary["trained_tokens"] <= labels_at_most < inputs / 5
    assert summary["tokens_per_s"] == pytest.approx(inputs / summary["train_wall_time_s"])


# ---------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_stops_with_one_line(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "data.train_bs=2", "train.epochs=100", f"output_dir={out}"]
    first = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        before = snapshot(out / ".hydra")
        with pytest.raises(ConfigError, match=rf"output_dir={out} is in use by another run \(pid {first.pid} on host "
                                              rf"{socket.gethostname()} since .*\): wait for it to end, or use another"):
            run_task(compose_config([*SMALL, f"output_dir={out}"]))
        assert snapshot(out / ".hydra") == before
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_on_its_host_and_refused_from_another(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = tmp_path / LOCK_FILE

    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}))
    RunLock.acquire(tmp_path).release()  # the holder died: taken over
    assert not lock.exists()

    lock.write_text(json.dumps({"pid": pid, "host": "elsewhere", "since": "then"}))
    with pytest.raises(ConfigError, match=rf"locked by another run \(pid {pid} on host elsewhere since then; "
                                          rf"hydralm cannot check a process on another host\).*delete {lock}"):
        RunLock.acquire(tmp_path)

    # A requeued SLURM job takes over its own earlier attempt's lock, from any host.
    lock.write_text(json.dumps({"pid": pid, "host": "elsewhere", "slurm": {"job_id": "42", "restart_count": 0}}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock.acquire(tmp_path).release()

    held = RunLock.acquire(tmp_path)  # a live holder, here this very process
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on host"):
        RunLock.acquire(tmp_path)
    held.release()
