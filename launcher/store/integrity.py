"""Checksums of the files in a published directory: a checkpoint records them in its COMPLETE
marker (`manifest`), a preprocessed dataset in `checksums.json` next to its splits
(`file_checksums`), so either split can be checked alone.

A manifest maps every file's path (relative, '/'-separated) to its size and its xxh3-128 digest.
xxh3 is a non-cryptographic hash: it detects corruption (bit flips, truncation, a missing file),
not tampering; what a checkpoint may contain is restricted separately (launcher/training/checkpoint.py).
It hashes at ~11 GB/s on one core, so reading the file, not hashing it, is the cost.

No torch here: the checks before any work use it.
"""

import json
from pathlib import Path
from typing import Iterable, Optional

import xxhash

from launcher.store.atomic import COMPLETE, IN_PROGRESS

ALGORITHM = "xxh3_128"
CHUNK_BYTES = 16 * 1024 * 1024
SMALL_FILE_BYTES = 64 * 1024 * 1024
CHECKSUMS = "checksums.json"  # a preprocessed dataset's record


class HashingWriter:
    """Wraps a binary stream: everything written through it is hashed on the way (no second read)."""

    def __init__(self, stream):
        self.stream = stream
        self.hash = xxhash.xxh3_128()
        self.error: Optional[OSError] = None  # the first failed write (callers may only see its effect)

    def write(self, data) -> int:
        self.hash.update(data)
        try:
            return self.stream.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    def __getattr__(self, name):  # tell, flush, fileno, close: the stream's own
        return getattr(self.stream, name)


def hash_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def manifest(directory: Path, digests: Optional[dict[str, str]] = None) -> dict:
    """{"algorithm", "files": {path: {"bytes", "digest"}}} of every file under `directory`.
    `digests` holds those already hashed while they were written; the rest are read here."""
    directory, digests = Path(directory), digests or {}
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != IN_PROGRESS):
        name = path.relative_to(directory).as_posix()
        files[name] = {"bytes": path.stat().st_size, "digest": digests.get(name) or hash_file(path)}
    return {"algorithm": ALGORITHM, "files": files}


def recorded_files(directory: Path) -> dict:
    """{path: {"bytes", "digest"}} from `directory`'s COMPLETE marker. Raises ValueError when it has none."""
    try:
        checksums = json.loads((Path(directory) / COMPLETE).read_text())["checksums"]
        files = checksums["files"] if checksums["algorithm"] == ALGORITHM else None
        valid = all(isinstance(e["bytes"], int) and isinstance(e["digest"], str) for e in files.values())
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise ValueError(f"its {COMPLETE} marker records no {ALGORITHM} checksums (cut off, or written by an "
                         f"older hydralm)")
    outside = [name for name in files if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise ValueError(f"its {COMPLETE} marker names {outside[0]!r}, outside the checkpoint")
    return files


def size_problem(directory: Path, files: dict) -> Optional[str]:
    """Cheap (no reading): the first recorded file that is missing or has another size."""
    for name, entry in files.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written (truncated?)"
    return None


def digest_problem(directory: Path, files: dict, names: Iterable[str]) -> Optional[str]:
    """The first of `names` whose content no longer matches its recorded digest."""
    for name in names:
        if hash_file(Path(directory) / name) != files[name]["digest"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def file_checksums(directory: Path, under: str = "") -> dict[str, str]:
    """xxh3-128 of every file under `directory` (or its subdirectory `under`) by relative path,
    the checksum record itself and the COMPLETE marker excluded: what `damaged_files` compares."""
    sums = {}
    for file in sorted(p for p in (Path(directory) / under).rglob("*") if p.is_file()):
        name = file.relative_to(directory).as_posix()
        if name not in (CHECKSUMS, COMPLETE, IN_PROGRESS):
            sums[name] = hash_file(file)
    return sums


def damaged_files(directory: Path, under: str = "") -> list[str]:
    """Files of `directory` (or of its subdirectory `under`) that are missing, changed or added
    since their checksums were recorded; the record itself when it is missing or unreadable."""
    try:
        recorded = json.loads((Path(directory) / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return [CHECKSUMS]
    recorded = {name: digest for name, digest in recorded.items() if name.startswith(under)}
    current = file_checksums(directory, under)
    return sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))
