"""Host (CPU) memory of this process: the allocator setting every task runs with, and its peak.

glibc serves a block above its mmap threshold with its own mapping, which goes back to the OS
when freed; smaller blocks come from heaps that keep freed memory for reuse. By default the
threshold rises (up to 32 MiB) each time such a mapped block is freed, so after the first steps
the per-layer parameter, gradient and optimizer buffers of FSDP2 (a few MiB each) land in heaps
spread over threads, where freed memory is kept but rarely fits the next request. For a 0.5B
Llama on 2 CPU ranks that kept up to 1.4 GiB per rank of freed memory between steps and about
0.8 GiB at the peak (bench/memory.py). A fixed 4 MiB threshold returns those buffers; the cost is
about 1 s more system time over 30 steps of the default tiny run (~4% of its CPU time).
"""

import ctypes
import ctypes.util
import os
import resource
import sys

MMAP_THRESHOLD_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def return_large_freed_blocks() -> None:
    """Fix glibc's mmap threshold (mallopt; a no-op elsewhere, or when MALLOC_MMAP_THRESHOLD_ is set)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, ...): leave the allocator alone
        pass


def peak_host_memory_gib() -> float:
    """The most resident memory this process has had (ru_maxrss), GiB."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux
