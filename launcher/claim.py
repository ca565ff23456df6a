"""Claiming an output directory for a training run, before anything in it is touched (no torch).

The rule: a directory holds one run. A run continues the run already there only when both have
the same identity (launcher/identity.py) and `resume` is `auto` (or names a checkpoint: then the
batch layout may differ, a resharded resume). Anything else that would write into a directory
holding a run's state (run_dir.RUN_STATE: checkpoints, metrics, model, ...) stops with one line
naming the first differing key, unless `overwrite=true`, which deletes the old run first. The
check runs before anything is written, Hydra's record of the job (`.hydra/`) included.

One exception: an earlier attempt of this same SLURM job (a requeue: same SLURM_JOB_ID, a higher
SLURM_RESTART_COUNT) is always continued, whatever `resume` and `overwrite` say, so a requeued
`overwrite=true` job does not delete its own progress.

`run.json` records the identity; `run.lock` (see RunLock) keeps a second run out while this one
lives.
"""

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, open_dict

from launcher import atomic, run_dir
from launcher.errors import AnotherRunsDirectory, ConfigError
from launcher.identity import TOKENIZER, TRAIN_SEQUENCES, differing_keys, layout_keys, run_identity

LOCK_FILE = "run.lock"
RUN_RECORD = "run.json"
OLD_RUN = "old-run"  # overwrite=true moves the old run into .old-run.removing/, then deletes it
WAYS_OUT = "start fresh in another output_dir (resume=never), or add overwrite=true to delete that run first"


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
    if present and _earlier_attempt_of_this_job(record):
        with open_dict(cfg):
            cfg.resume = "auto"  # a requeued job continues its own checkpoints
    elif present and cfg.overwrite:
        _check_resume_survives_overwrite(cfg.resume, output_dir)
        _remove_old_run(output_dir)
    elif present:
        _check_same_run(cfg, output_dir, record, current)
    run_dir.tidy(output_dir)
    atomic.write_json(output_dir / RUN_RECORD, {"identity": current, "slurm": _slurm_attempt()})


def _check_same_run(cfg: DictConfig, output_dir: Path, record: Optional[dict], current: dict) -> None:
    what = run_dir.describe_run(output_dir)
    if record is None:
        raise AnotherRunsDirectory(f"output_dir={output_dir} holds a run hydralm cannot identify ({what}; no "
                                   f"{RUN_RECORD}): {WAYS_OUT}")
    explicit_resume = cfg.resume not in ("auto", "never")
    saved = record["identity"]
    differing = differing_keys(saved, current, ignore=layout_keys(cfg) if explicit_resume else ())
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
    built; the tokenizer and the data's size are compared when it loads (launcher/checkpoint.py)."""
    if cfg.resume in ("auto", "never"):
        return
    try:
        fingerprint = json.loads((Path(cfg.resume) / run_dir.TRAINER_STATE).read_text())["fingerprint"]
        saved = {k: v for k, v in fingerprint.items() if k not in (TOKENIZER, TRAIN_SEQUENCES)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a damaged trainer_state.json is reported where the checkpoint loads
    run_dir.check_compatible(saved, current, Path(cfg.resume), ignore=layout_keys(cfg))


def _shown(identity: dict, key: str) -> str:
    return repr(identity[key]) if key in identity else "(unset)"


def _check_resume_survives_overwrite(resume: str, output_dir: Path) -> None:
    if resume in ("auto", "never"):
        return
    if Path(resume).resolve().is_relative_to(output_dir.resolve()):
        raise ConfigError(f"overwrite=true would delete resume={resume} (it is inside output_dir={output_dir}): "
                          f"resume from a copy outside it, or drop overwrite=true")


def _remove_old_run(output_dir: Path) -> None:
    """Move the old run's state out of the way, then delete it. run.json goes first: a kill
    midway leaves state nobody can identify, which the next run refuses (or overwrites again)."""
    trash = atomic.removing_path(output_dir / OLD_RUN)
    atomic.remove(output_dir / OLD_RUN)  # a trash an earlier overwrite left behind
    trash.mkdir()
    names = [RUN_RECORD] + [entry.name for entry in output_dir.iterdir()
                            if run_dir.state_name(entry.name) in run_dir.RUN_STATE]
    for name in names:
        if (output_dir / name).exists():
            os.replace(output_dir / name, trash / name)
    atomic.remove(output_dir / OLD_RUN)


def _read_record(output_dir: Path) -> Optional[dict]:
    try:
        record = json.loads((output_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("identity"), dict) else None


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
