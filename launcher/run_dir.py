"""What lives where in a run's output directory, and finding checkpoints in it (no torch).

    <output_dir>/
        checkpoints/checkpoint-<step:08d>/   training checkpoints (launcher/checkpoint.py)
        final-model/                          the exported model (launcher/export.py)
        metrics.jsonl, summary.json           launcher/metrics.py, launcher/trainer.py
"""

import json
import re
from pathlib import Path
from typing import Optional

from launcher.atomic import is_complete
from launcher.errors import ConfigError

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{8})$")
TRAINER_STATE = "trainer_state.json"
HF_DIR = "hf"
FINAL_MODEL = "final-model"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"checkpoint-{step:08d}"


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a directory named like a checkpoint; None for any other name (`*.bak`, ...)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_training_checkpoint(path: Path) -> bool:
    return is_complete(path) and (Path(path) / TRAINER_STATE).is_file()


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


def hf_dir(checkpoint: Path) -> Path:
    """The HF config, generation config and tokenizer a checkpoint carries (what export needs)."""
    return Path(checkpoint) / HF_DIR


def drop_metrics_after(output_dir: Path, step: int) -> None:
    """Rows an interrupted run logged after its checkpoint are logged again by the resumed run."""
    metrics = Path(output_dir) / METRICS
    if metrics.is_file():
        kept = [row for row in metrics.read_text().splitlines() if _logged_step(row) <= step]
        metrics.write_text("".join(row + "\n" for row in kept))


def _logged_step(row: str) -> float:
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by the kill
        return float("inf")


def check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    if not Path(resume).is_dir():
        raise ConfigError(f"resume={resume} must be auto, never, or an existing checkpoint directory")
    if not is_training_checkpoint(Path(resume)):
        raise ConfigError(f"resume={resume} is not a complete training checkpoint (no COMPLETE marker; "
                          f"an interrupted save leaves a .partial directory that is never used)")
