"""hydralm's own files (run.lock, run.json, COMPLETE, metrics.jsonl, the data cache's lock) are
never written through a symlink, nor opened when something else stands at their name: one line,
and every byte the user owned is still there."""

import os
from pathlib import Path

import pytest
from conftest import compose_config, run_launcher
from test_ownership import assert_kept, snapshot, user_tree

from launcher.errors import ConfigError
from launcher.store import atomic
from launcher.store.claim import LOCK_FILE, RUN_RECORD, claim


def put_in_the_way(path: Path, kind: str, target: Path) -> None:
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
        (path / "mine.txt").write_text("mine")
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
@pytest.mark.parametrize("name", [LOCK_FILE, RUN_RECORD])
def test_claim_refuses_a_lock_or_record_that_is_not_a_regular_file(tmp_path, name, kind):
    home = user_tree(tmp_path / "home")
    out = tmp_path / "run"
    out.mkdir()
    put_in_the_way(out / name, kind, home / "corpus.jsonl")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        claim(compose_config([f"output_dir={out}"]), out).release()
    expected = {"symlink": "a symlink", "directory": "a directory", "fifo": "a FIFO"}[kind]
    assert str(err.value) == (f"{out / name} is {expected} where hydralm keeps its own file: hydralm never "
                              f"writes through it; move it away")
    assert_kept(before, tmp_path)


@pytest.mark.slow
def test_a_symlinked_run_lock_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    """The attack: each run truncated the link's target with the lock JSON, then deleted the link."""
    home = user_tree(tmp_path / "home")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(home / "corpus.jsonl")
    before = snapshot(tmp_path)
    result = run_launcher([f"output_dir={out}", "train.max_steps=1"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("hydralm")] == [
        f"hydralm: error: {out / LOCK_FILE} is a symlink where hydralm keeps its own file: hydralm never writes "
        f"through it; move it away"]
    assert_kept(before, tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_marker_or_record_is_never_written_through_a_symlink_or_over_a_directory(tmp_path, kind):
    home = user_tree(tmp_path / "home")
    result = tmp_path / "result"
    result.mkdir()
    put_in_the_way(result / atomic.COMPLETE, kind, home / "corpus.jsonl")
    put_in_the_way(tmp_path / f".eval.json.{os.getpid()}.tmp", "symlink", home / "notes" / "paper.tex")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="where hydralm keeps its own file"):
        atomic.write_json(result / atomic.COMPLETE, {"written_by": "hydralm"})
    with pytest.raises(ConfigError, match=rf"\.eval\.json\.{os.getpid()}\.tmp is a symlink"):
        atomic.write_json(tmp_path / "eval.json", {"eval_loss": 1.0})
    assert_kept(before, tmp_path)


@pytest.mark.parametrize("append", [False, True])
def test_metrics_are_never_appended_through_a_symlink(tmp_path, append):
    from launcher.training.metrics import RunLog

    home = user_tree(tmp_path / "home")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(home / "corpus.jsonl")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="metrics.jsonl is a symlink"):
        RunLog(out, total_steps=1, enabled=True, append=append)
    assert_kept(before, tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_the_data_cache_lock_is_never_opened_through_a_symlink(tmp_path, kind):
    from launcher.data.preprocessing import lock_path, one_builder

    home = user_tree(tmp_path / "home")
    entry = tmp_path / "cache" / "entry"
    entry.parent.mkdir()
    put_in_the_way(lock_path(entry), kind, home / "corpus.jsonl")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"\.entry\.lock is a " + kind):
        with one_builder(entry):
            pass
    assert_kept(before, tmp_path)


def a_finished_run(out: Path) -> None:
    """A training run's directory as a run leaves it: run.json, final-model/, Hydra's record."""
    claim(compose_config([f"output_dir={out}"]), out).release()
    with atomic.atomic_directory(out / "final-model") as staging:
        (staging / "model.safetensors").write_bytes(b"trained weights")
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("optimizer:\n  lr: 0.001\n")


@pytest.mark.parametrize("task", ["export", "evaluate", "preprocess"])
@pytest.mark.parametrize("live", [False, True])
def test_export_evaluate_and_preprocess_never_write_into_a_runs_directory(tmp_path, task, live):
    from launcher.cli.app import run_task

    out = tmp_path / "run"
    a_finished_run(out)
    lock = claim(compose_config([f"output_dir={out}"]), out) if live else None  # a run training there now
    before = snapshot(out)
    try:
        with pytest.raises(ConfigError) as err:
            run_task(compose_config([f"task={task}", f"output_dir={out}"]))
        assert_kept(before, out)  # the live run's lock included
    finally:
        if lock:
            lock.release()
    found = "run.lock and run.json there (a live run holds it)" if live else "run.json there"
    assert str(err.value) == (f"output_dir={out} is a training run's directory ({found}): task=export/evaluate/"
                              f"preprocess write only into a directory of their own; name another output_dir "
                              f"(e.g. {out}/export)")


def test_a_run_that_started_after_the_checks_is_still_refused_by_the_task(tmp_path):
    """resolve_output_dir checks again where the task writes (a run may have claimed the directory
    between the checks and the task): nothing written, Hydra's record included."""
    from launcher.store.outputs import resolve_output_dir
    from launcher.distributed import ONE_PROCESS as SINGLE_PROCESS

    out = tmp_path / "run"
    a_finished_run(out)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="is a training run's directory"):
        resolve_output_dir(compose_config(["task=export", f"output_dir={out}"]), SINGLE_PROCESS)
    assert_kept(before, out)
    export_dir = resolve_output_dir(compose_config(["task=export", f"output_dir={out / 'export'}"]), SINGLE_PROCESS)
    assert export_dir == out / "export" and export_dir.is_dir()


def test_the_embedded_tokenizer_is_identified_by_its_content_not_its_install_path(tmp_path, monkeypatch):
    """The same commit from another clone or venv is the same run (issue 22, case 6)."""
    import hashlib
    import shutil

    from launcher import schema
    from launcher.store.identity import run_identity

    identities = []
    for clone in ("clone-a", "venv/lib/site-packages"):
        assets = tmp_path / clone / "assets"
        shutil.copytree(schema.ASSETS_DIR / "tiny_bpe", assets / "tiny_bpe")
        monkeypatch.setattr(schema, "ASSETS_DIR", assets)
        identities.append(run_identity(compose_config(["model=tiny"])))
    assert identities[0] == identities[1]
    assert not any(str(tmp_path) in str(value) for value in identities[0].values())
    expected = hashlib.sha256()
    for file in sorted((assets / "tiny_bpe").iterdir()):
        expected.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    assert identities[0]["model.tokenizer"] == f"hydralm-asset:tiny_bpe sha256:{expected.hexdigest()}"
    (assets / "tiny_bpe" / "tokenizer_config.json").write_text("{}")  # another tokenizer: another run
    assert run_identity(compose_config(["model=tiny"]))["model.tokenizer"] != identities[0]["model.tokenizer"]


@pytest.mark.parametrize("directory", ["/", "/usr", "/etc", "/var", "/proc", "~", "/usr/../etc"])
def test_root_system_directories_and_home_itself_are_refused_as_output_dir(directory, monkeypatch, tmp_path):
    from launcher.store.outputs import check_output_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    path = os.path.expanduser(directory)
    with pytest.raises(ConfigError, match=r"is (a system directory|your home directory): a run's files need a "
                                          r"folder of their own"):
        check_output_dir(path)
    check_output_dir(str(tmp_path / "home" / "runs" / "a"))  # a folder inside them is fine


def test_a_final_model_cut_short_by_a_kill_is_never_loadable(tmp_path, monkeypatch):
    """A kill while the weights stream in left `.final-model.partial` that from_pretrained loaded
    with most tensors zero; config.json is now written after every weight."""
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.distributed import distributed
    from launcher.model.modeling import load_tokenizer
    from launcher.training import export
    from launcher.training.trainer import build_training_model

    cfg = compose_config([f"output_dir={tmp_path}"])
    written = []

    def killed_at_the_last_tensor(model, name, full, where):
        written.append(name)
        if len(written) == len(model.state_dict()) - 1:  # (tied embeddings: one name fewer)
            raise KeyboardInterrupt  # like a kill: no cleanup runs
        return real(model, name, full, where)

    real = export._write_saved
    monkeypatch.setattr(export, "_write_saved", killed_at_the_last_tensor)
    with distributed() as world:
        tokenizer = load_tokenizer(cfg.model)
        model = build_training_model(cfg, tokenizer, world)
        with pytest.raises(KeyboardInterrupt):
            export.save_hf_model(model, tokenizer, tmp_path / "final-model", world)
    partial = atomic.partial_path(tmp_path / "final-model")
    assert any(partial.glob("*.safetensors")) and not (tmp_path / "final-model").exists()
    with pytest.raises((OSError, ValueError), match="config.json"):  # no config.json: nothing to load
        AutoModelForCausalLM.from_pretrained(partial, torch_dtype=torch.float32)


@pytest.mark.parametrize("edit", ["identity", "writes", "unsealed"])
def test_a_hand_edited_run_record_is_refused_not_trusted(tmp_path, edit):
    """An edited identity would let a finished run answer for another config; an edited `writes`
    would tell overwrite=true to delete the user's entries."""
    import json

    out = tmp_path / "run"
    claim(compose_config(["optimizer.lr=1e-3", f"output_dir={out}"]), out).release()
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    user_tree(out / "mine")
    record = json.loads((out / RUN_RECORD).read_text())
    if edit == "identity":
        record["identity"]["optimizer.lr"] = 3e-3
    elif edit == "writes":
        record["writes"].append("mine")
    else:
        del record["checksum"]
    (out / RUN_RECORD).write_text(json.dumps(record))
    before = snapshot(out)
    for overwrite in ("false", "true"):
        with pytest.raises(ConfigError) as err:
            claim(compose_config(["optimizer.lr=3e-3", f"overwrite={overwrite}", f"output_dir={out}"]), out)
        assert str(err.value) == (f"{out / RUN_RECORD} does not match the checksum hydralm sealed it with (edited by "
                                  f"hand, or written by an older hydralm): hydralm does not trust a run record it "
                                  f"cannot check; put back the original, or use another output_dir")
        assert_kept(before, out)


def test_a_data_file_edited_in_place_with_the_same_size_and_mtime_is_a_new_cache_key(tmp_path):
    """Small files are identified by their content: stale cached tokens are never reused."""
    from launcher.data.sources import files_fingerprint

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "first version"}\n')
    stat = corpus.stat()
    before = files_fingerprint([corpus])
    corpus.write_text('{"text": "other version"}\n')  # same size
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    assert corpus.stat().st_size == stat.st_size and corpus.stat().st_mtime_ns == stat.st_mtime_ns
    assert files_fingerprint([corpus]) != before
    corpus.write_text('{"text": "first version"}\n')
    assert files_fingerprint([corpus]) == before  # the same content is the same entry (touching rebuilds nothing)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_fifo_or_a_device_as_a_data_file_is_one_line(tmp_path, special):
    from launcher.data.sources import file_list, files_fingerprint

    path = tmp_path / "corpus.jsonl"
    if special == "fifo":
        os.mkfifo(path)
    else:
        path = Path(special)
    with pytest.raises(ConfigError, match=r"is not a regular file \(a FIFO, a device or a socket\)"):
        file_list(str(path), key=f"data.load_path={path}")
    with pytest.raises(ConfigError, match="is not a regular file"):
        files_fingerprint([path])


def test_evaluate_never_replaces_an_eval_json_it_did_not_write(tmp_path):
    from launcher.cli.app import run_task
    from launcher.cli.validate import check_config

    out = user_tree(tmp_path / "results")
    (out / "eval.json").write_text('{"my_metric": 0.93}\n')
    before = snapshot(out)
    with pytest.raises(ConfigError) as err:
        run_task(compose_config(["task=evaluate", f"output_dir={out}"]))
    assert str(err.value) == (f"output_dir={out} holds an eval.json hydralm did not write: hydralm replaces only "
                              f"what it wrote; name another output_dir (or move that file away)")
    assert_kept(before, out)
    atomic.write_json(out / "eval.json", {"written_by": "hydralm", "eval_loss": 2.0})  # an earlier evaluation
    check_config(compose_config(["task=evaluate", f"output_dir={out}"]))  # the same checks, passing now
