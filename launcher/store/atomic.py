"""Atomic directories: the one way hydralm publishes a result on disk.

A result (a checkpoint, `final-model/`, a preprocessed dataset, a report) is written into a
sibling `.<name>.partial/` directory, marked complete, then swapped in with renames. A reader
therefore sees either the previous complete result or the new one, never a half-written one,
whatever instant a process dies at. A result is deleted the same way round: renamed to
`.<name>.removing/` first, then deleted, so a half-deleted directory never carries the result's
name. `recover` finishes or undoes a swap or a removal that a kill interrupted. A write that
fails (a full disk) removes its staging directory; `out_of_space` turns the failure into the one
line a run stops with. A checkpoint's COMPLETE marker holds the checksum of every file
(launcher/store/integrity.py).

Ownership, the one rule: hydralm deletes or replaces only what it can prove it wrote. A result is
hydralm's when it is a real directory holding hydralm's COMPLETE marker (a JSON object); a staging
or trash directory while it holds the IN_PROGRESS mark written when it was made. Anything else
under one of these names (a user's directory, a symlink, a file) is refused or left alone, never
deleted (`owned`, `check_replaceable`).

This module imports no torch: `--cfg job` and the checks before any work use it.
"""

import errno
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from launcher.errors import ConfigError, RunStopped

COMPLETE = "COMPLETE"
IN_PROGRESS = ".hydralm-in-progress"  # inside a staging or trash directory until it is committed or gone
WRITTEN_BY = {"written_by": "hydralm"}


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def previous_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def removing_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.removing")


LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(partial|previous|removing)$")


def is_complete(directory: Path) -> bool:
    return (Path(directory) / COMPLETE).is_file()


def owned(path: Path) -> bool:
    """hydralm can prove it wrote `path`: a real directory (not a symlink) holding its COMPLETE
    marker (a regular file holding a JSON object) or its IN_PROGRESS mark (a regular file)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return _is_regular(path / IN_PROGRESS) or (_is_regular(path / COMPLETE) and _holds_json_object(path / COMPLETE))


def _is_regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _holds_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def _mark_in_progress(directory: Path) -> None:
    """Created in a directory hydralm has just made (no rename: any instant after leaves the mark)."""
    with open(directory / IN_PROGRESS, "x") as f:
        json.dump(WRITTEN_BY, f)


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_replaceable(target: Path, key: str) -> None:
    """Before writing `target`: it is new, empty, or a result hydralm wrote; anything else is
    refused, naming `key` (the setting that chose the path)."""
    target = Path(target)
    if not (target.exists() or target.is_symlink()) or owned(target) or _is_empty_directory(target):
        return
    what = ("a symlink" if target.is_symlink() else "a file" if not target.is_dir() else
            f"a directory hydralm did not write (no {COMPLETE} marker of hydralm's in it)")
    raise ConfigError(f"{key}={target} is {what}: hydralm replaces only what it wrote; name a new or empty "
                      f"directory (or move that one away)")


def _clear_way(path: Path, target: Path) -> None:
    """Free the name `path` that hydralm needs beside `target`: delete it when it is hydralm's (or
    an empty directory); refuse when it is anything else."""
    if owned(path):
        _delete(path)
    elif _is_empty_directory(path):
        path.rmdir()
    elif path.exists() or path.is_symlink():
        raise ConfigError(f"{path} is in the way of {Path(target).name} and hydralm did not write it: move it away")


def recover(target: Path) -> None:
    """Finish or undo a swap or removal a kill interrupted: a complete `.previous` next to a
    missing target is the last complete result (put it back); anything else of hydralm's beside
    the target (a `.previous` being deleted, a `.partial` that was never swapped in, a
    `.removing`) is garbage and deleted. Entries under these names that hydralm cannot prove it
    wrote are left alone."""
    target, previous = Path(target), previous_path(Path(target))
    if owned(previous) and not (target.exists() or target.is_symlink()) and is_complete(previous):
        os.replace(previous, target)
    for leftover in (previous, partial_path(target), removing_path(target)):
        if owned(leftover):
            _delete(leftover)
        elif _is_empty_directory(leftover):  # made, then killed before its mark: nothing in it to lose
            leftover.rmdir()


def recover_all(directory: Path) -> None:
    """`recover` every result of `directory` that has leftovers of an interrupted swap or removal
    (only hydralm's own: `recover` leaves other entries alone)."""
    directory = Path(directory)
    if directory.is_dir():
        for entry in list(directory.iterdir()):
            match = LEFTOVER.match(entry.name)
            if match:
                recover(directory / match.group("target"))


def remove(target: Path) -> None:
    """Delete a result so that no kill leaves a half-deleted directory under its name."""
    target = Path(target)
    _clear_way(removing_path(target), target)  # a removal of hydralm's that a kill interrupted
    if target.exists():
        os.replace(target, removing_path(target))
        _delete(removing_path(target))


def trash_directory(target: Path) -> Path:
    """A new, marked `.<name>.removing/` to move entries into before deleting them together."""
    trash = removing_path(target)
    _clear_way(trash, target)  # an earlier trash of hydralm's that a kill left behind
    trash.mkdir()
    _mark_in_progress(trash)
    return trash


def _delete(path: Path) -> None:
    """Delete a file or a tree; what another process deleted first is fine, any other error is not.
    A directory's ownership marks go last, so a kill midway leaves it still provably hydralm's."""
    try:
        if path.is_dir() and not path.is_symlink():
            for entry in path.iterdir():
                if entry.name not in (COMPLETE, IN_PROGRESS):
                    _delete_entry(entry)
            for mark in (COMPLETE, IN_PROGRESS):
                (path / mark).unlink(missing_ok=True)
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _delete_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=_unless_gone)
    else:
        path.unlink(missing_ok=True)


def _unless_gone(function, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def begin(target: Path, key: str = "path") -> Path:
    """A fresh staging directory for `target` (after recovering from any interrupted swap),
    marked as hydralm's. `target` must be new, empty or hydralm's (`check_replaceable`)."""
    target = Path(target)
    check_replaceable(target, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = partial_path(target)
    _clear_way(staging, target)
    staging.mkdir()
    _mark_in_progress(staging)
    return staging


def commit(staging: Path, target: Path, marker: dict | None = None, fsync: bool = False) -> None:
    """Mark `staging` complete (the COMPLETE marker holds `marker` as JSON) and swap it in as
    `target`. `fsync`: flush the marker and the directory entries, for results that must survive
    a power loss (checkpoints)."""
    write_json(staging / COMPLETE, {**WRITTEN_BY, **(marker or {})}, fsync=fsync)
    (staging / IN_PROGRESS).unlink(missing_ok=True)  # after COMPLETE: it is hydralm's all along
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
    """Swap a complete staging directory in as `target` (the old one, if any, is removed; it
    must be hydralm's or empty, checked again here: it may have appeared since `begin`)."""
    check_replaceable(target, "path")
    previous = previous_path(target)
    _clear_way(previous, target)  # left by a kill while it was being deleted: os.replace needs the name free
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    _delete(previous)


# ---------------------------------------------------------------------- hydralm's own files
# A lock, a marker, a record or a log hydralm keeps at a fixed name is opened without following a
# symlink (a link there would make hydralm truncate and write whatever it points at) and only when
# it is a regular file (a directory, a FIFO or a device there would be a traceback or a hang).


def _kind(mode: int) -> str:
    return ("a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else
            "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def _not_ours(path: Path, kind: str) -> ConfigError:
    return ConfigError(f"{path} is {kind} where hydralm keeps its own file: hydralm never writes through it; "
                       f"move it away")


def check_own_file(path: Path) -> None:
    """`path` is absent or a regular file (not a symlink): else one line naming what is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise _not_ours(Path(path), _kind(mode))


def open_own_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """`os.open` of one of hydralm's own files, never through a symlink and only a regular file
    (O_NONBLOCK while opening: a FIFO there must not block the open)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            check_own_file(path)  # names what is there
            raise _not_ours(Path(path), "not a regular file") from None
        raise
    st_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        raise _not_ours(Path(path), _kind(st_mode))
    os.set_blocking(fd, True)
    return fd


def read_own_json(path: Path):
    """The JSON in one of hydralm's own files; None when absent or unreadable as JSON."""
    try:
        fd = open_own_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            return json.loads(f.read())
        except ValueError:
            return None


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write a file through a temporary file and a rename: a reader (or a kill) sees the old
    content or the new, never a cut-off file. The temporary name holds the process id, so
    processes rewriting one file (the jobs of a sweep) never share one. Neither name is written
    through a symlink or over a directory (`open_own_file`)."""
    path = Path(path)
    check_own_file(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(open_own_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value, fsync: bool = False) -> None:
    write_text(path, json.dumps(value, indent=1), fsync)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(err: BaseException) -> Optional[str]:
    """The OS's words ("No space left on device", "Disk quota exceeded") when `err` or an error
    it wraps (a cause, a context, torch.distributed.checkpoint's per-rank failures) is a full disk
    or quota, else None. Libraries that keep only the text (safetensors) are matched by it."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return os.strerror(current.errno)
        words = next((os.strerror(n) for n in NO_SPACE if os.strerror(n) in str(current)), None)
        if words:
            return words
        failures = getattr(current, "failures", None)
        pending += [current.__cause__, current.__context__,
                    *(failure[0] for failure in (failures.values() if isinstance(failures, dict) else ()))]
    return None


def out_of_space(err: BaseException, target: Path, kept: str) -> Optional[RunStopped]:
    """The one line a run stops with when writing `target` found the disk full, else None."""
    words = no_space(err)
    if words is None:
        return None
    return RunStopped(f"error: no space left on {Path(target).parent} ({words}) while writing {Path(target).name}: "
                      f"its partial files are removed; kept: {kept}")
