"""What checkpoint checksums cost: a DCP save with the shards hashed while they are written
(hydralm's writer) against torch's plain FileSystemWriter, alternating, median of N; then the
verification read (xxh3-128 of every file, as on resume/export/evaluate) in GB/s.

    python bench/checksums.py              # a 1 GiB state, 5 saves of each
    python bench/checksums.py --smoke      # 16 MiB, 1 save of each

The verification figure is for files in the page cache (just written); from a cold disk it is
the disk's read bandwidth, since xxh3 hashes faster than any disk reads.
The last line is `ratio save-with-checksums/plain: <r>`.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `launcher` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from bench.common import publish
from launcher.store import integrity
from launcher.training.checkpoint import _ChecksummingWriter

GIB = 1024**3


def state(total_bytes: int) -> dict:
    """fp32 tensors of 64 MiB (or one smaller), like a model and its AdamW moments."""
    each = min(total_bytes, 64 * 1024**2) // 4
    return {f"t{i}": torch.randn(each) for i in range(max(1, total_bytes // (each * 4)))}


def timed_save(values: dict, directory: Path, checksums: bool) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    writer = _ChecksummingWriter(directory) if checksums else FileSystemWriter(directory)
    start = time.perf_counter()
    dcp.save(values, storage_writer=writer, no_dist=True)
    return time.perf_counter() - start


def timed_verify(directory: Path) -> float:
    files = integrity.manifest(directory)["files"]
    start = time.perf_counter()
    assert integrity.digest_problem(directory, files, sorted(files)) is None
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="16 MiB, one save of each")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the saved state")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose
    size, repeats = (16 * 1024**2, 1) if args.smoke else (int(args.gib * GIB), args.repeats)
    values = state(size)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="hydralm-checksums-") as tmp:
        times = {"plain": [], "checksums": []}
        for _ in range(repeats):  # alternating, so load on the machine hits both
            times["plain"].append(timed_save(values, Path(tmp) / "plain", checksums=False))
            times["checksums"].append(timed_save(values, Path(tmp) / "checksums", checksums=True))
        verify = statistics.median(timed_verify(Path(tmp) / "checksums") for _ in range(repeats))
    gib = size / GIB
    save = {name: statistics.median(values) for name, values in times.items()}
    result = {"gib": gib, "save_s": save, "save_extra_s_per_gib": (save["checksums"] - save["plain"]) / gib,
              "verify_s_per_gib": verify / gib, "ratio": save["checksums"] / save["plain"]}
    print(f"checkpoint checksums ({gib:.3g} GiB state, median of {repeats})")
    print(f"  DCP save, plain writer:        {save['plain'] / gib:7.3f} s/GiB")
    print(f"  DCP save, hashed while written: {save['checksums'] / gib:7.3f} s/GiB "
          f"({result['save_extra_s_per_gib']:+.3f} s/GiB)")
    print(f"  verification (page cache):     {result['verify_s_per_gib']:7.3f} s/GiB "
          f"({1 / result['verify_s_per_gib']:.1f} GiB/s)")
    return publish(result, args.json, {"save-with-checksums/plain": result["ratio"]})


if __name__ == "__main__":
    main()
