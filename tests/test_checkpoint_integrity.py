"""What a checkpoint may do to the process that loads it: nothing but load.

Crafted checkpoints (a pickle payload in DCP's `.metadata`, or in a non-tensor value) are refused on
every path that loads one (resume, export, evaluate) without running the payload; damaged ones
(truncated shard, cut-off trainer_state.json, missing rank file, flipped bit, impossible counters)
are refused naming the file, and `resume=auto` falls back to the newest intact checkpoint.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
from conftest import assert_same_weights, compose_config, final_weights, run_launcher

from launcher.cli.app import run_task
from launcher.errors import ConfigError

SMALL = ["train.max_seq_len=64", "data.train_bs=2", "data.eval_bs=4", "train.max_eval_batches=1",
         "train.max_steps=6", "train.logging_steps=2", "train.checkpointing_enabled=true", "train.save_steps=2",
         "train.keep_last_n=null"]


def checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"checkpoint-{step:08d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run that kept its checkpoints of steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference")
    run_task(compose_config([*SMALL, f"output_dir={out}"]))
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def copy_unfinished_run(reference: Path, tmp_path: Path) -> Path:
    """The reference as a run killed after its last checkpoint: no final model, no summary."""
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "final-model")
    (out / "summary.json").unlink()
    return out


def rewrite_marker(directory: Path) -> None:
    """What an attacker does after editing a checkpoint: a COMPLETE marker whose checksums match
    (computed here with xxhash directly, as the format documents)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "COMPLETE"):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size,
                                                        "digest": xxhash.xxh3_128(path.read_bytes()).hexdigest()}
    (directory / "COMPLETE").write_text(json.dumps({"checksums": {"algorithm": "xxh3_128", "files": files}}))


class Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------- no code from a checkpoint


def crafted_metadata(reference: Path, tmp_path: Path, marker: Path) -> Path:
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint(reference, 4), crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_marker(crafted)
    return crafted


def task_overrides(path: str, crafted: Path, tmp_path: Path) -> list[str]:
    return {
        "resume": [*SMALL, f"resume={crafted}"],
        "export": ["task=export", f"checkpoint={crafted}"],
        "evaluate": ["task=evaluate", f"checkpoint={crafted}", *SMALL[:4]],
    }[path] + [f"output_dir={tmp_path / 'out'}"]


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@pytest.mark.parametrize("path", ["resume", "export", "evaluate"])
def test_a_pickle_payload_in_the_dcp_metadata_is_refused_and_never_runs(reference, tmp_path, path):
    marker = tmp_path / "payload-ran"
    crafted = crafted_metadata(reference, tmp_path, marker)
    with pytest.raises(ConfigError, match=r"\.metadata refers to posix\.system, which is not checkpoint metadata"):
        run_task(compose_config(task_overrides(path, crafted, tmp_path)))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
def test_the_refusal_is_one_line_and_exit_2(reference, tmp_path):
    marker = tmp_path / "payload-ran"
    crafted = crafted_metadata(reference, tmp_path, marker)
    result = run_launcher(task_overrides("export", crafted, tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"hydralm: error: checkpoint={crafted} cannot be loaded: .metadata refers to posix.system, which is not "
        f"checkpoint metadata (refused: loading it could run code)"]
    assert not marker.exists() and not (tmp_path / "out" / "final-model").exists()


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
def test_a_pickle_payload_in_a_non_tensor_value_is_refused_and_never_runs(reference, tmp_path):
    """DCP stores non-tensor values (the optimizer's hyperparameters) as pickles, which its default
    planner loads with torch.load(weights_only=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    marker = tmp_path / "payload-ran"
    dcp_to_torch_save(checkpoint(reference, 4), tmp_path / "plain.pt")
    state = torch.load(tmp_path / "plain.pt", weights_only=False)  # our own benign checkpoint
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    crafted = tmp_path / "crafted"
    dcp.save(state, checkpoint_id=crafted, no_dist=True)
    for name in ("trainer_state.json", "rank-0.json", "hf"):
        source = checkpoint(reference, 4) / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, crafted / name)
    rewrite_marker(crafted)
    with pytest.raises(ConfigError, match=r"the value of optim\.param_groups\.0\.lr is not plain data"):
        run_task(compose_config(task_overrides("resume", crafted, tmp_path)))
    assert not marker.exists()


# ---------------------------------------------------------------------- damaged checkpoints


def truncate_shard(path: Path) -> str:
    shard = path / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    return "__0_0.distcp has"


def cut_off_trainer_state(path: Path) -> str:
    state = path / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    return "trainer_state.json has"


def remove_rank_file(path: Path) -> str:
    (path / "rank-0.json").unlink()
    return "rank-0.json is missing"


def flip_a_bit(path: Path) -> str:
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return "__0_0.distcp does not match its checksum"


@pytest.mark.slow  # seconds, not milliseconds (a training run or a model load): the full suite runs it
@pytest.mark.parametrize("damage", [truncate_shard, cut_off_trainer_state, remove_rank_file])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(reference, tmp_path, capfd, damage):
    out = copy_unfinished_run(reference, tmp_path)
    expected_problem = damage(checkpoint(out, 6))
    damaged_bytes = {p.name: p.read_bytes() for p in checkpoint(out, 6).iterdir() if p.is_file()}
    summary = run_task(compose_config([*SMALL, f"output_dir={out}"]))
    captured = capfd.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("hydralm: warning:")]
    assert len(warnings) == 1 and expected_problem in warnings[0], captured.err
    assert warnings[0].endswith(f"; moved aside to checkpoint-00000006.damaged (kept for you to look at, never "
                                f"loaded); resuming from {checkpoint(out, 4)} instead")
    aside = out / "checkpoints" / "checkpoint-00000006.damaged"  # kept byte for byte, not deleted
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == damaged_bytes
    assert warnings[0].startswith(f"hydralm: warning: {checkpoint(out, 6)} cannot be loaded (")
    assert f"hydralm: resuming from {checkpoint(out, 4)} (step 4" in captured.out
    assert summary["steps"] == 6
    assert_same_weights(final_weights(out), final_weights(reference))
    # The damaged checkpoint was replaced by the new save of step 6.
    assert (checkpoint(out, 6) / "rank-0.json").is_file() and "checksums" in (checkpoint(out, 6) / "COMPLETE").read_text()


def test_a_flipped_bit_is_named_and_an_explicit_resume_of_it_is_refused(reference, tmp_path, monkeypatch):
    from launcher.store import integrity

    monkeypatch.setattr(integrity, "SMALL_FILE_BYTES", 0)  # like a large shard: hashed at load, not before
    out = copy_run(reference, tmp_path)
    expected = flip_a_bit(checkpoint(out, 4))
    with pytest.raises(ConfigError, match=rf"resume=.*checkpoint-00000004 cannot be loaded: {expected}"):
        run_task(compose_config([*SMALL, f"resume={checkpoint(out, 4)}", f"output_dir={tmp_path / 'other'}"]))
    with pytest.raises(ConfigError, match=rf"checkpoint=.*checkpoint-00000004 cannot be loaded: {expected}"):
        run_task(compose_config(["task=export", f"checkpoint={checkpoint(out, 4)}", f"output_dir={tmp_path / 'e'}"]))


def test_when_no_checkpoint_is_intact_resume_auto_stops_naming_the_latest(reference, tmp_path):
    out = copy_unfinished_run(reference, tmp_path)
    for step in (2, 4, 6):
        truncate_shard(checkpoint(out, step))
    with pytest.raises(ConfigError, match=rf"resume=auto: no intact checkpoint in {out / 'checkpoints'}: "
                                          rf".*checkpoint-00000006 cannot be loaded \(__0_0.distcp has .*\), nor 2 "
                                          rf"older checkpoint\(s\); move them aside, or use resume=never"):
        run_task(compose_config([*SMALL, f"output_dir={out}"]))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["progress"].update(step=-5), "progress.step=-5 is not valid (an integer >= 1)"),
    (lambda s: s["progress"].update(step=2), "progress.step=2 is not valid (the directory is named for step 6)"),
    (lambda s: s["progress"].update(epoch_samples=1.5), "progress.epoch_samples=1.5 is not valid"),
    (lambda s: s["progress"].update(last_eval_loss=float("nan")), "progress.last_eval_loss=nan is not valid"),
    (lambda s: s.update(world_size=0), "world_size=0 is not valid"),
    (lambda s: s.update(world_size=2), "rank-1.json is missing"),
    (lambda s: s["progress"].pop("epoch"), "progress={"),
    (lambda s: s.update(scheduler=[]), "scheduler=[] is not valid (a JSON object)"),
    (lambda s: s.update(format_version=2), "format_version=2 is not valid"),
])
def test_trainer_state_values_no_save_could_write_are_refused(reference, tmp_path, capfd, edit, message):
    """Even with checksums that match (an edited file): the values themselves are checked."""
    out = copy_run(reference, tmp_path)
    latest = checkpoint(out, 6)
    state = json.loads((latest / "trainer_state.json").read_text())
    edit(state)
    (latest / "trainer_state.json").write_text(json.dumps(state))
    rewrite_marker(latest)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_task(compose_config([*SMALL, f"resume={latest}", f"output_dir={tmp_path / 'other'}"]))
    assert not (tmp_path / "other").exists()  # refused before any work


def test_a_checkpoint_without_checksums_is_refused_naming_why(reference, tmp_path):
    out = copy_run(reference, tmp_path)
    (checkpoint(out, 6) / "COMPLETE").write_text("{}")  # what hydralm wrote before checksums
    with pytest.raises(ConfigError, match="its COMPLETE marker records no xxh3_128 checksums"):
        run_task(compose_config(["task=export", f"checkpoint={checkpoint(out, 6)}", f"output_dir={tmp_path / 'e'}"]))


def test_the_marker_lists_every_file_with_its_size_and_checksum(reference):
    for step in (2, 4, 6):
        directory = checkpoint(reference, step)
        recorded = json.loads((directory / "COMPLETE").read_text())["checksums"]
        on_disk = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*")
                   if p.is_file() and p.name != "COMPLETE"}
        assert recorded["algorithm"] == "xxh3_128" and recorded["files"].keys() == on_disk.keys()
        assert {".metadata", "__0_0.distcp", "rank-0.json", "trainer_state.json", "hf/config.json"} <= on_disk.keys()
        for name, path in on_disk.items():
            assert recorded["files"][name] == {"bytes": path.stat().st_size,
                                               "digest": xxhash.xxh3_128(path.read_bytes()).hexdigest()}
