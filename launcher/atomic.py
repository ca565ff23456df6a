"""Atomic directories: the one way hydralm publishes a result on disk.

A result (a checkpoint, `final-model/`, a preprocessed dataset, a report) is written into a
sibling `.<name>.partial/` directory, marked complete, then swapped in with renames. A reader
therefore sees either the previous complete result or the new one, never a half-written one,
whatever instant a process dies at. `recover` finishes or undoes a swap that a kill interrupted.

This module imports no torch: `--cfg job` and the checks before any work use it.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COMPLETE = "COMPLETE"


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def previous_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def is_complete(directory: Path) -> bool:
    return (Path(directory) / COMPLETE).is_file()


def recover(target: Path) -> None:
    """Finish or undo a swap a kill interrupted: a `.previous` next to a missing target is the
    last complete result (put it back); next to a present target it is garbage. A `.partial` is
    never complete in place (the swap renames it first), so it is removed."""
    target, previous = Path(target), previous_path(Path(target))
    if previous.exists():
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(previous, target)
    shutil.rmtree(partial_path(target), ignore_errors=True)


def begin(target: Path) -> Path:
    """A fresh, empty staging directory for `target` (after recovering from any interrupted swap)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = partial_path(target)
    staging.mkdir()
    return staging


def commit(staging: Path, target: Path, marker: dict | None = None, fsync: bool = False) -> None:
    """Mark `staging` complete (the COMPLETE marker holds `marker` as JSON) and swap it in as
    `target`. `fsync`: flush the marker and the directory entries, for results that must survive
    a power loss (checkpoints)."""
    write_json(staging / COMPLETE, marker or {}, fsync=fsync)
    if fsync:
        fsync_directory(staging)
    publish(staging, Path(target))
    if fsync:
        fsync_directory(Path(target).parent)


@contextmanager
def atomic_directory(target: Path, marker: dict | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without an exception, commit it as
    `target`. On an exception the staging directory is removed and `target` is left as it was."""
    staging = begin(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit(staging, target, marker, fsync)


def publish(staging: Path, target: Path) -> None:
    """Swap a complete staging directory in as `target` (the old one, if any, is removed)."""
    previous = previous_path(target)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def write_json(path: Path, value, fsync: bool = False) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees a cut-off file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
