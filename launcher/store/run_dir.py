"""What lives where in a run's output directory, and finding checkpoints in it (no torch).

    <output_dir>/
        run.json, run.lock                    the run's identity and its lock (launcher/store/claim.py)
        checkpoints/checkpoint-<step:08d>/   training checkpoints (launcher/training/checkpoint.py)
        final-model/                          the exported model (launcher/training/export.py)
        metrics.jsonl                         one row per log point (launcher/training/metrics.py)
        summary.json                          written last: present only once the run has finished
"""

import json
import os
import re
from pathlib import Path
from typing import Optional

from launcher.errors import ConfigError
from launcher.job_log import announce
from launcher.store import atomic
from launcher.store.identity import differing_keys

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{8,})$")
TRAINER_STATE = "trainer_state.json"
HF_DIR = "hf"
FINAL_MODEL = "final-model"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BASE_MODEL = "base-model"  # the frozen base a peft=lora run's adapters apply to, when model.path cannot rebuild it
# What a training run leaves in its output directory (besides run.json and Hydra's record): a
# directory holding any of these holds a run. launcher/training/loggers.py and launcher/training/trainer.py write
# the last four (wandb's run id and files, TensorBoard events, a random-init LoRA base).
RUN_STATE = (CHECKPOINTS_DIR, METRICS, SUMMARY, FINAL_MODEL, f"{FINAL_MODEL}-merged", "wandb_run_id", "wandb",
             "tensorboard", BASE_MODEL)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"checkpoint-{step:08d}"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a directory named like a checkpoint; None for any other name (`*.bak`, ...)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_training_checkpoint(path: Path) -> bool:
    return atomic.is_complete(path) and (Path(path) / TRAINER_STATE).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """This directory's complete checkpoints, oldest step first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and is_training_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def run_state(output_dir: Path) -> list[str]:
    """The names of RUN_STATE present in `output_dir` (with hydralm's leftovers of their atomic
    swaps; a user's entry under a leftover's name is not run state)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    present = {state_name(entry.name) for entry in output_dir.iterdir()
               if not atomic.LEFTOVER.match(entry.name) or atomic.owned(entry)}
    return [name for name in RUN_STATE if name in present]


def state_name(name: str) -> str:
    """The result an entry belongs to: `final-model` for `.final-model.partial`, else the name."""
    leftover = atomic.LEFTOVER.match(name)
    return leftover.group("target") if leftover else name


def describe_run(output_dir: Path) -> str:
    """`checkpoints up to step 8, metrics.jsonl, final-model`: what a run left, for messages."""
    latest = latest_checkpoint(output_dir)
    return ", ".join(f"checkpoints up to step {checkpoint_step(latest)}" if name == CHECKPOINTS_DIR and latest
                     else name for name in run_state(output_dir))


def tidy(output_dir: Path) -> None:
    """Finish or undo what a killed run left half done: interrupted swaps and removals
    (launcher/store/atomic.py). Checkpoint directories without their COMPLETE marker (a removal
    interrupted by an older hydralm, or a directory hydralm did not write) are moved aside with a
    message: nothing completes them, nothing reads them, and hydralm cannot prove they are its own."""
    output_dir = Path(output_dir)
    atomic.recover_all(output_dir)
    checkpoints = output_dir / CHECKPOINTS_DIR
    atomic.recover_all(checkpoints)
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if checkpoint_step(entry) is not None and entry.is_dir() and not atomic.is_complete(entry):
                aside = move_aside(entry, "incomplete")
                announce(f"hydralm: {entry} has no {atomic.COMPLETE} marker (a save or removal cut short, or not "
                         f"hydralm's): moved it aside to {aside.name}, never read nor deleted; delete it when you "
                         f"no longer need it")


def move_aside(path: Path, why: str) -> Path:
    """Rename `path` to `<name>.<why>` (`.<why>-2`, ... when taken): out of every listing of
    checkpoints (CHECKPOINT_NAME does not match it), kept for the user to look at."""
    path = Path(path)
    aside, n = path.with_name(f"{path.name}.{why}"), 1
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.{why}-{n}")
    os.replace(path, aside)
    return aside


def remove_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Checkpoints beyond the step a run continues from belong to the future it abandons (an
    explicit `resume=` of an earlier checkpoint): left there, pruning or `resume=auto` would mix
    them with the new ones."""
    later = [p for p in complete_checkpoints(output_dir) if checkpoint_step(p) > step]
    for path in later:
        atomic.remove(path)
    return later


def finished_summary(output_dir: Path) -> Optional[dict]:
    """The summary of a finished run (summary.json is written last), else None."""
    summary = Path(output_dir) / SUMMARY
    return json.loads(summary.read_text()) if summary.is_file() else None


def checkpoint_fingerprint(checkpoint: Path) -> Optional[dict]:
    """The settings a training checkpoint was written with (its trainer_state.json's fingerprint)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text()).get("fingerprint")


def hf_dir(checkpoint: Path) -> Path:
    """The HF config, generation config and tokenizer a checkpoint carries (what export needs)."""
    return Path(checkpoint) / HF_DIR


def drop_metrics_after(output_dir: Path, step: int) -> None:
    """Rows an interrupted run logged after its checkpoint are logged again by the resumed run
    (step -1: every row, for a run that starts over)."""
    metrics = Path(output_dir) / METRICS
    atomic.check_own_file(metrics)  # a symlink or a FIFO there is refused, never read or replaced
    if metrics.is_file():
        kept = [row for row in metrics.read_text().splitlines() if _logged_step(row) <= step]
        # a kill now leaves the old rows or the kept ones, never half a file
        atomic.write_text(metrics, "".join(row + "\n" for row in kept))


def _logged_step(row: str) -> float:
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by the kill
        return float("inf")


def check_compatible(saved: dict, current: dict, path: Path, ignore=()) -> None:
    """A checkpoint's fingerprint against this run's; `ignore`: keys an explicit resume may
    change (the batch layout, launcher/store/identity.py)."""
    differing = differing_keys(saved, current, ignore)
    if differing:
        details = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in differing[:4])
        raise ConfigError(
            f"resume: {path} was written with a different config ({details}); "
            f"resume a checkpoint of this config, or start over in another output_dir (or with overwrite=true)"
        )


def check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    if not Path(resume).is_dir():
        raise ConfigError(f"resume={resume} must be auto, never, or an existing checkpoint directory")
    if not is_training_checkpoint(Path(resume)):
        raise ConfigError(f"resume={resume} is not a complete training checkpoint (no COMPLETE marker; "
                          f"an interrupted save leaves a .partial directory that is never used)")
