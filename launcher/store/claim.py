"""Claiming an output directory for a training run, before anything in it is touched (no torch).

The rule: a directory holds one run. A run continues the run already there only when both have
the same identity (launcher/store/identity.py) and `resume` is `auto` (or names a checkpoint: then the
batch layout may differ, a resharded resume). Anything else that would write into a directory
holding a run's state (run_dir.RUN_STATE: checkpoints, metrics, model, ...) stops with one line
naming the first differing key, unless `overwrite=true`, which deletes the old run first. The
check runs before anything is written, Hydra's record of the job (`.hydra/`) included.

Ownership (launcher/store/atomic.py has the rule): `run.json` lists the names the run writes
(`writes`). `overwrite=true` deletes only those, and only in a directory whose `run.json`
hydralm wrote; state under those names without a `run.json` (a user's `wandb/`,
`metrics.jsonl`, ...) is never deleted, and no refusal suggests a flag that would.

One exception: an earlier attempt of this same SLURM job (a requeue: same SLURM_JOB_ID, a higher
SLURM_RESTART_COUNT) is always continued, whatever `resume` and `overwrite` say, so a requeued
`overwrite=true` job does not delete its own progress.

`run.json` records the identity, sealed with a checksum of its content (a record edited by hand is
refused, not trusted); `run.lock` (see RunLock) keeps a second run out while this one
lives.
"""

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, open_dict

from launcher.errors import AnotherRunsDirectory, ConfigError
from launcher.job_log import announce
from launcher.store import atomic, run_dir
from launcher.store.identity import TOKENIZER, TRAIN_SEQUENCES, differing_keys, layout_keys, length_keys, run_identity

LOCK_FILE = "run.lock"
RUN_RECORD = "run.json"
OLD_RUN = "old-run"  # overwrite=true moves the old run into .old-run.removing/, then deletes it
WAYS_OUT = "start fresh in another output_dir (resume=never), or add overwrite=true to delete that run first"
# Rewritten by every job in the directory, never deleted: the lock, Hydra's record, the job log.
JOB_RECORD = (LOCK_FILE, ".hydra", "hydralm.log")
NOT_OURS = "hydralm deletes only what it wrote: use another output_dir, or move them away yourself"


def claim(cfg: DictConfig, output_dir: Path) -> "RunLock":
    """Lock `output_dir` and apply the directory rule; on success `run.json` holds this run's
    identity. Raises ConfigError (and holds nothing) when the run may not write there."""
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock.acquire(output_dir)
        try:
            _apply_rule(cfg, output_dir)
        except BaseException:
            lock.release()
            raise
    except ConfigError:
        if created:  # a refused run leaves no directory behind
            output_dir.rmdir()
        raise
    return lock


def _apply_rule(cfg: DictConfig, output_dir: Path) -> None:
    current = run_identity(cfg)
    _check_resume_checkpoint(cfg, current)
    record = _read_record(output_dir)
    present = run_dir.run_state(output_dir)
    _check_all_ours(output_dir, record, present)
    if present and _earlier_attempt_of_this_job(record):
        with open_dict(cfg):
            cfg.resume = "auto"  # a requeued job continues its own checkpoints
    elif present and cfg.overwrite:
        _check_resume_survives_overwrite(cfg.resume, output_dir)
        _remove_old_run(output_dir, _written_by_run(record))
    elif present:
        _check_same_run(cfg, output_dir, record, current)
    run_dir.tidy(output_dir)
    atomic.write_json(output_dir / RUN_RECORD, _sealed({"identity": current, "slurm": _slurm_attempt(),
                                                        "writes": list(run_dir.RUN_STATE)}))


def _written_by_run(record: dict) -> set[str]:
    """The names the run lists in its run.json as its own (every sealed run.json has `writes`)."""
    return set(record["writes"])


def _check_all_ours(output_dir: Path, record: Optional[dict], present: list[str]) -> None:
    """Run state hydralm did not record writing is never continued, mixed with, or deleted."""
    foreign = present if record is None else [name for name in present if name not in _written_by_run(record)]
    if foreign:
        why = f"no {RUN_RECORD}" if record is None else f"not listed in its {RUN_RECORD}"
        raise AnotherRunsDirectory(f"output_dir={output_dir} holds {', '.join(foreign)} that hydralm did not "
                                   f"record writing ({why}): {NOT_OURS}")


def _check_same_run(cfg: DictConfig, output_dir: Path, record: dict, current: dict) -> None:
    what = run_dir.describe_run(output_dir)
    explicit_resume = cfg.resume not in ("auto", "never")
    saved = record["identity"]
    may_differ = {*length_keys(cfg), *(layout_keys(cfg) if explicit_resume else ())}  # a longer run continues
    differing = differing_keys(saved, current, ignore=may_differ)
    if differing:
        key = differing[0]
        more = f" and {len(differing) - 1} more key{'s' if len(differing) > 2 else ''}" if len(differing) > 1 else ""
        raise AnotherRunsDirectory(f"output_dir={output_dir} holds another run ({key}={_shown(saved, key)} there, "
                                   f"{_shown(current, key)} now{more}; it has {what}): {WAYS_OUT}")
    if cfg.resume == "never":
        raise AnotherRunsDirectory(f"output_dir={output_dir} holds a run of this config ({what}) and resume=never "
                                   f"does not start over on top of it: continue it with resume=auto, {WAYS_OUT}")


def _check_resume_checkpoint(cfg: DictConfig, current: dict) -> None:
    """An explicit `resume=<checkpoint>` of another run is refused now, not after the model is
    built; the tokenizer and the data's size are compared when it loads (launcher/training/checkpoint.py)."""
    if cfg.resume in ("auto", "never"):
        return
    try:
        fingerprint = run_dir.checkpoint_fingerprint(Path(cfg.resume))
        saved = {k: v for k, v in fingerprint.items() if k not in (TOKENIZER, TRAIN_SEQUENCES)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a damaged trainer_state.json is reported where the checkpoint loads
    run_dir.check_compatible(saved, current, Path(cfg.resume), ignore={*layout_keys(cfg), *length_keys(cfg)})


def _shown(identity: dict, key: str) -> str:
    return repr(identity[key]) if key in identity else "(unset)"


def _check_resume_survives_overwrite(resume: str, output_dir: Path) -> None:
    if resume in ("auto", "never"):
        return
    if Path(resume).resolve().is_relative_to(output_dir.resolve()):
        raise ConfigError(f"overwrite=true would delete resume={resume} (it is inside output_dir={output_dir}): "
                          f"resume from a copy outside it, or drop overwrite=true")


def _remove_old_run(output_dir: Path, written: set[str]) -> None:
    """Move the old run's own entries (those its run.json lists, with their leftovers of
    interrupted swaps) out of the way, then delete them, and say what went and what stayed.
    run.json goes last: a kill midway leaves a run.json that still lists what is left."""
    trash = atomic.trash_directory(output_dir / OLD_RUN)
    ours = [entry.name for entry in output_dir.iterdir()
            if run_dir.state_name(entry.name) in written and
            (entry.name in written or atomic.owned(entry))]
    for name in ours:
        os.replace(output_dir / name, trash / name)
    os.replace(output_dir / RUN_RECORD, trash / RUN_RECORD)
    atomic.remove(output_dir / OLD_RUN)
    kept = sorted(entry.name for entry in output_dir.iterdir() if entry.name not in JOB_RECORD)
    announce(f"hydralm: overwrite=true removed the old run's {', '.join(sorted(ours))} and {RUN_RECORD} from "
             f"{output_dir}" + (f"; left what hydralm did not write there: {', '.join(kept)}" if kept else ""))


def _read_record(output_dir: Path) -> Optional[dict]:
    """The run record hydralm sealed (its checksum matches), None when there is none. One that is
    not sealed or whose checksum differs (edited by hand) is refused: it would decide which run
    this is and what overwrite=true deletes."""
    path = output_dir / RUN_RECORD
    record = atomic.read_own_json(path)
    if not (isinstance(record, dict) and isinstance(record.get("identity"), dict)):
        return None
    if record.get("checksum") != _checksum(record):
        raise AnotherRunsDirectory(f"{path} does not match the checksum hydralm sealed it with (edited by hand, or "
                                   f"written by an older hydralm): hydralm does not trust a run record it cannot "
                                   f"check; put back the original, or use another output_dir")
    return record


def _sealed(record: dict) -> dict:
    return {**record, "checksum": _checksum(record)}


def _checksum(record: dict) -> str:
    """sha256 of the record without its checksum, as canonical JSON."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------- SLURM attempts


def _slurm_attempt() -> Optional[dict]:
    job = os.environ.get("SLURM_JOB_ID")
    return {"job_id": job, "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else None


def _earlier_attempt_of_this_job(holder: Optional[dict]) -> bool:
    """`holder` (run.json or run.lock) was written by an earlier attempt of this SLURM job."""
    theirs, ours = (holder or {}).get("slurm"), _slurm_attempt()
    return bool(theirs and ours and theirs.get("job_id") == ours["job_id"]
                and int(theirs.get("restart_count", 0)) < ours["restart_count"])


# ---------------------------------------------------------------------- the lock


class RunLock:
    """`run.lock`: an flock held while the run lives, naming its holder (pid, host, SLURM job).

    Takeover rule. On the holder's host the kernel drops the flock when the process dies, however
    it dies, so a lock whose flock can be taken is stale and is taken over. From another host a
    live holder cannot be told from a dead one (flocks may not cross hosts on NFS or Lustre), so
    the run stops, naming the holder, unless the holder is an earlier attempt of this SLURM job
    (a requeue); delete the file by hand once you know that run is gone. Where the filesystem
    has no flock at all, a same-host holder counts as stale once its pid is gone.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: Path) -> "RunLock":
        path = Path(output_dir) / LOCK_FILE
        fd, locked = _open_locked(path)
        try:
            holder = _read_holder(fd)
            if holder is not None and not _stale(holder, locked):
                other_host = holder.get("host") != socket.gethostname()
                raise AnotherRunsDirectory(_in_use(output_dir, holder, other_host=other_host))
            _write_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        if _same_file(self.fd, self.path):
            self.path.unlink()
        os.close(self.fd)  # drops the flock


def _open_locked(path: Path) -> tuple[int, bool]:
    """An fd of `path` holding its flock (True), or without one where the filesystem has none."""
    while True:
        fd = atomic.open_own_file(path, os.O_RDWR | os.O_CREAT)  # never through a symlink
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd) or {}
            os.close(fd)
            raise AnotherRunsDirectory(_in_use(path.parent, holder, other_host=False)) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            return fd, False
        if _same_file(fd, path):  # not a file its last holder unlinked while we opened it
            return fd, True
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 65536) or b"null")
    except ValueError:  # cut short by a kill while it was written: nobody holds it
        return None
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slurm": _slurm_attempt()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)


def _stale(holder: dict, locked: bool) -> bool:
    if _earlier_attempt_of_this_job(holder):
        return True
    if holder.get("host") != socket.gethostname():
        return False
    return locked or not _alive(holder.get("pid"))


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _in_use(output_dir: Path, holder: dict, other_host: bool) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"
    if other_host:
        return (f"output_dir={output_dir} is locked by another run ({who}; hydralm cannot check a process on "
                f"another host): use another output_dir, or delete {Path(output_dir) / LOCK_FILE} once that run is gone")
    return f"output_dir={output_dir} is in use by another run ({who}): wait for it to end, or use another output_dir"
