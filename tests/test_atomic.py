"""A kill at every instant of a swap, a removal, a prune and an overwrite leaves nothing that
wedges the next run: what the next start does (launcher/store/atomic.py's recover, run_dir.tidy) ends
with the old result or the new one, complete, and no leftovers.

Each case forks a child that does the operation and dies (os._exit, no cleanup, like SIGKILL)
just before its k-th filesystem change, for k = 1, 2, ... until the child gets through.
"""

import os
import shutil
from pathlib import Path

import pytest
from conftest import compose_config

from launcher.errors import ConfigError
from launcher.store import atomic, run_dir
from launcher.store.claim import RUN_RECORD, claim

KILLED = 77
CHANGES = ("replace", "rename", "unlink", "rmdir", "mkdir")


def killed_at_every_instant(operation, prepare, check):
    """For k = 1, 2, ...: `prepare()`, then `operation()` in a child that exits just before its
    k-th filesystem change, then `check(finished)`. Returns how many instants were tried."""
    k = 0
    while True:
        k += 1
        prepare()
        pid = os.fork()
        if pid == 0:  # the child: count changes, die before the k-th
            count = [0]

            def hooked(real):
                def change(*args, **kwargs):
                    count[0] += 1
                    if count[0] == k:
                        os._exit(KILLED)
                    return real(*args, **kwargs)
                return change

            for name in CHANGES:
                setattr(os, name, hooked(getattr(os, name)))
            try:
                operation()
            except BaseException:
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, KILLED), f"the operation failed (exit {code}) at instant {k}"
        check(finished=code == 0)
        if code == 0:
            return k


def write_files(path: Path, version: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights").write_text(version * 1000)
    (path / "nested").mkdir()
    (path / "nested" / "part").write_text(version)


def write_result(path: Path, version: str) -> None:
    write_files(path, version)
    (path / atomic.COMPLETE).write_text("{}")


def version_of(path: Path) -> str:
    assert atomic.is_complete(path), f"{path} is not complete"
    version = (path / "nested" / "part").read_text()
    assert (path / "weights").read_text() == version * 1000, f"{path} is half written"
    return version


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if atomic.LEFTOVER.match(p.name))


@pytest.mark.slow
def test_a_swap_killed_at_any_instant_recovers_to_the_old_or_the_new_result(tmp_path):
    target = tmp_path / "final-model"

    def prepare():
        shutil.rmtree(tmp_path)
        write_result(target, "old")

    def publish_new():
        staging = atomic.begin(target)
        write_files(staging, "new")
        atomic.commit(staging, target)

    def check(finished):
        atomic.recover_all(tmp_path)  # what the next run does at its start
        assert version_of(target) == ("new" if finished else version_of(target))
        assert leftovers(tmp_path) == []
        publish_new()  # and the next swap goes through (no "Directory not empty")
        assert version_of(target) == "new" and leftovers(tmp_path) == []

    instants = killed_at_every_instant(publish_new, prepare, check)
    assert instants > 6  # the renames and every file of the old result's deletion


def test_a_swap_killed_while_the_previous_result_is_deleted_does_not_wedge_the_next_swap(tmp_path):
    """Without the next start's recover: publish itself clears a half-deleted `.previous`."""
    target = tmp_path / "final-model"
    write_result(target, "old")
    write_result(atomic.previous_path(target), "older")
    shutil.rmtree(atomic.previous_path(target) / "nested")  # half deleted (its COMPLETE marker goes last)
    staging = atomic.partial_path(target)
    write_result(staging, "new")
    atomic.publish(staging, target)
    assert version_of(target) == "new" and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_removal_killed_at_any_instant_leaves_the_result_whole_or_gone(tmp_path):
    target = tmp_path / "checkpoint-00000002"

    def prepare():
        shutil.rmtree(tmp_path)
        write_result(target, "old")

    def check(finished):
        atomic.recover_all(tmp_path)
        assert not target.exists() if finished else (not target.exists() or version_of(target) == "old")
        assert leftovers(tmp_path) == []

    killed_at_every_instant(lambda: atomic.remove(target), prepare, check)


@pytest.mark.slow
def test_a_prune_killed_at_any_instant_is_cleaned_up_at_the_next_start(tmp_path):
    out = tmp_path / "run"

    def prepare():
        shutil.rmtree(tmp_path)
        for step in (2, 4):
            write_result(run_dir.checkpoint_dir(out, step), str(step))
            (run_dir.checkpoint_dir(out, step) / run_dir.TRAINER_STATE).write_text("{}")

    def check(finished):
        run_dir.tidy(out)
        kept = [p.name for p in run_dir.complete_checkpoints(out)]
        assert kept == ["checkpoint-00000004"] if finished else kept[-1] == "checkpoint-00000004"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept  # nothing half deleted left

    killed_at_every_instant(lambda: atomic.remove(run_dir.checkpoint_dir(out, 2)), prepare, check)


def test_a_checkpoint_without_its_marker_is_moved_aside_with_a_message_not_deleted(tmp_path, capsys):
    """Left half deleted by an older prune, or a directory hydralm did not write: hydralm cannot
    prove it is its own, so it is kept, out of the listing, and the user is told."""
    half = run_dir.checkpoint_dir(tmp_path, 2)
    write_result(half, "old")
    (half / atomic.COMPLETE).unlink()  # rmtree in place had got this far
    (half / "notes.txt").write_text("the user's")
    write_result(run_dir.checkpoint_dir(tmp_path, 4), "4")
    (run_dir.checkpoint_dir(tmp_path, 4) / run_dir.TRAINER_STATE).write_text("{}")
    before = sorted((p.name, p.read_bytes()) for p in half.rglob("*") if p.is_file())
    run_dir.tidy(tmp_path)
    aside = tmp_path / "checkpoints" / "checkpoint-00000002.incomplete"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [aside.name, "checkpoint-00000004"]
    assert sorted((p.name, p.read_bytes()) for p in aside.rglob("*") if p.is_file()) == before
    assert f"{half} has no COMPLETE marker" in capsys.readouterr().out
    assert [p.name for p in run_dir.complete_checkpoints(tmp_path)] == ["checkpoint-00000004"]


@pytest.mark.slow
def test_an_overwrite_killed_at_any_instant_is_finished_by_the_next_overwrite(tmp_path):
    out = tmp_path / "run"
    old = compose_config(["optimizer.lr=1e-3", f"output_dir={out}"])
    new = compose_config(["optimizer.lr=3e-3", "overwrite=true", f"output_dir={out}"])
    without_overwrite = compose_config(["optimizer.lr=3e-3", f"output_dir={out}"])

    def prepare():
        shutil.rmtree(tmp_path)
        claim(old, out).release()
        write_result(run_dir.checkpoint_dir(out, 2), "old")
        (out / run_dir.METRICS).write_text('{"step": 0}\n')
        write_result(out / run_dir.FINAL_MODEL, "old")

    def check(finished):
        if not finished and run_dir.run_state(out):  # what is left of the old run is never taken for the new one
            with pytest.raises(ConfigError, match="holds"):
                claim(without_overwrite, out).release()
            claim(new, out).release()
        elif not finished:  # all of it was moved aside: its deletion is finished by any run
            claim(without_overwrite, out).release()
        assert run_dir.run_state(out) == [] and leftovers(out) == []
        assert (out / RUN_RECORD).is_file()

    killed_at_every_instant(lambda: claim(new, out).release(), prepare, check)
