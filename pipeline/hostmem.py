"""Host memory for CPU workers: keep freed blocks for reuse instead of handing them back.

glibc's malloc serves large blocks (from 128 KiB, rising with what gets freed) with a fresh mmap
and unmaps them on free, so each layer of each batch faults in and zeroes its activations again:
on the bench corpus, 1.5M page faults and a fifth of the run's time in the kernel. Here blocks up
to 32 MiB (glibc's ceiling for this setting) come from the heap, and up to 1 GiB of freed heap is
kept, so the next batch reuses it. Larger blocks are still mapped fresh: taking them from the heap
too (mmap off altogether) saves another ~6% of the run but fragments the heap, and resident
memory then grows with the length of the shard (1.0 -> 1.5 GiB over 110k tokens), which breaks
the storage engine's bounded-memory promise. `make bench` (benchmarks/bench_extract.py --cpu
and bench_storage.py) prints the figures.

Called once by a worker that runs the model on the CPU. ATTNPIPE_KEEP_FREED_MEMORY=0 turns it
off; it does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("attnpipe")

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_BYTES = 32 << 20  # the largest glibc accepts on 64-bit
_TRIM_BYTES = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """Switch glibc malloc to reuse freed blocks (once per process); True when it is on."""
    global _done
    if _done:
        return True
    if os.environ.get("ATTNPIPE_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    except (OSError, AttributeError):  # not the glibc we know: leave malloc as it is
        return False
    if not _done:
        log.debug("mallopt refused; host memory is handed back as usual")
    return _done


def available_bytes(device) -> int | None:
    """Memory a run can still take on `device`: the host's MemAvailable on a CPU, free memory
    on a CUDA device; None where it cannot be read."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
