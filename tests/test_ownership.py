"""hydralm deletes or replaces only what it can prove it wrote (launcher/store/atomic.py's rule).

Each case creates the user's data first, runs the command as a user would type it, and checks
that every byte of that data is still there afterwards.
"""

import hashlib
import os
from pathlib import Path

import pytest
from conftest import compose_config, run_launcher

from launcher.errors import ConfigError
from launcher.store import atomic, run_dir
from launcher.store.claim import RUN_RECORD, claim

ROOT = Path(__file__).resolve().parents[1]


def user_tree(root: Path) -> Path:
    """A user's directory: a corpus, a project file, a nested folder, a symlink."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text('{"text": "my only copy"}\n' * 50)
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "paper.tex").write_text("\\section{Results}\n")
    (root / "link").symlink_to("corpus.jsonl")
    return root


def snapshot(root: Path) -> dict:
    """Every entry under `root` with its bytes (or link target): what must survive."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def assert_kept(before: dict, root: Path) -> None:
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before


@pytest.mark.slow
def test_preprocess_into_a_users_directory_is_refused_before_any_work(tmp_path):
    """The critical case: `data.save_path=<an existing directory>` used to delete all of it."""
    data = user_tree(tmp_path / "project")
    before = snapshot(data)
    result = run_launcher(["task=preprocess", "data=files", f"data.load_path={data / 'corpus.jsonl'}",
                           f"data.save_path={data}", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hydralm")]
    assert lines == [f"hydralm: error: data.save_path={data} is a directory hydralm did not write (no COMPLETE "
                     f"marker of hydralm's in it): hydralm replaces only what it wrote; name a new or empty "
                     f"directory (or move that one away)"]
    assert_kept(before, data)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["file", "symlink", "checkpoint"])
def test_preprocess_refuses_a_file_a_symlink_and_another_hydralm_result(tmp_path, kind):
    target = tmp_path / "target"
    user_tree(tmp_path / "elsewhere")
    if kind == "file":
        target.write_text("mine")
    elif kind == "symlink":
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.mkdir()
        (target / "model.safetensors").write_text("weights")
        (target / atomic.COMPLETE).write_text('{"written_by": "hydralm"}')
    before = snapshot(tmp_path)
    cfg = compose_config(["task=preprocess", f"data.save_path={target}"])
    from tasks.preprocess import check_save_path
    with pytest.raises(ConfigError, match="data.save_path="):
        check_save_path(cfg)
    assert_kept(before, tmp_path)


def test_preprocess_writes_into_a_new_or_empty_directory_and_replaces_its_own_output(tmp_path):
    from tasks.preprocess import check_save_path
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "new", tmp_path / "empty"):
        check_save_path(compose_config(["task=preprocess", f"data.save_path={path}"]))
    own = tmp_path / "own"
    with atomic.atomic_directory(own) as staging:
        (staging / "checksums.json").write_text("{}")
    check_save_path(compose_config(["task=preprocess", f"data.save_path={own}"]))  # its own earlier output


def test_publish_never_replaces_a_directory_hydralm_did_not_write(tmp_path):
    """`task=export output_dir=<a folder holding the user's final-model>` and the like."""
    target = user_tree(tmp_path / "final-model")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="hydralm did not write"):
        with atomic.atomic_directory(target) as staging:
            (staging / "model.safetensors").write_text("new")
    assert_kept(before, tmp_path)
    assert not atomic.partial_path(target).exists()


def run_state_of_a_user(out: Path) -> None:
    """Names hydralm also uses, written by the user's own tools (no run.json)."""
    user_tree(out)
    (out / "wandb").mkdir()
    (out / "wandb" / "run-1.wandb").write_bytes(b"\x00\x01 user logs")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "my-model.pt").write_bytes(b"weights of another project")
    (out / "tensorboard").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "acc": 0.9}\n')


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_deletes_run_state_hydralm_did_not_record(tmp_path, overwrite):
    out = tmp_path / "home"
    run_state_of_a_user(out)
    before = snapshot(out)
    cfg = compose_config([f"output_dir={out}", f"overwrite={str(overwrite).lower()}"])
    with pytest.raises(ConfigError) as err:
        claim(cfg, out)
    message = str(err.value)
    assert "hydralm did not record writing (no run.json)" in message
    assert "checkpoints" in message and "wandb" in message and "metrics.jsonl" in message
    assert "overwrite=true" not in message  # no refusal recommends a flag that would delete them
    assert_kept(before, out)
    assert not (out / RUN_RECORD).exists() and not (out / "run.lock").exists()


def test_overwrite_removes_the_old_runs_entries_only_and_names_what_it_left(tmp_path, capsys):
    out = tmp_path / "run"
    old = compose_config(["optimizer.lr=1e-3", f"output_dir={out}"])
    claim(old, out).release()
    (out / run_dir.METRICS).write_text('{"step": 0}\n')
    with atomic.atomic_directory(run_dir.checkpoint_dir(out, 2)) as staging:
        (staging / run_dir.TRAINER_STATE).write_text("{}")
    user_tree(out)  # the user's files beside the run
    (out / ".my.partial").mkdir()  # a user entry under a name like hydralm's leftovers
    (out / ".my.partial" / "draft.txt").write_text("draft")
    before = {k: v for k, v in snapshot(out).items() if not k.startswith(("checkpoints", "metrics", "run."))}
    capsys.readouterr()
    claim(compose_config(["optimizer.lr=3e-3", "overwrite=true", f"output_dir={out}"]), out).release()
    said = capsys.readouterr().out
    assert "overwrite=true removed the old run's checkpoints, metrics.jsonl and run.json" in said
    assert "left what hydralm did not write there: .my.partial, corpus.jsonl, link, notes" in said
    assert_kept(before, out)
    assert not (out / "checkpoints").exists() and not (out / run_dir.METRICS).exists()
    assert (out / RUN_RECORD).is_file()


@pytest.mark.parametrize("suffix", ["partial", "previous", "removing"])
def test_a_run_leaves_user_entries_named_like_leftovers_alone(tmp_path, suffix):
    out = tmp_path / "run"
    out.mkdir()
    for name in (f".data.{suffix}", f".final-model.{suffix}", f".checkpoints.{suffix}"):
        (out / name).mkdir()
        (out / name / "keep.txt").write_text(name)
    (out / f".notes.{suffix}").write_text("a file")
    before = snapshot(out)
    claim(compose_config([f"output_dir={out}"]), out).release()
    run_dir.tidy(out)
    assert_kept(before, out)


def test_a_removal_in_the_way_of_a_result_is_refused_not_deleted(tmp_path):
    target = tmp_path / "final-model"
    (tmp_path / ".final-model.removing").mkdir(parents=True)
    (tmp_path / ".final-model.removing" / "mine").write_text("x")
    with atomic.atomic_directory(target) as staging:
        (staging / "w").write_text("1")
    with pytest.raises(ConfigError, match="in the way of final-model"):
        atomic.remove(target)
    assert (tmp_path / ".final-model.removing" / "mine").read_text() == "x"
