"""Host memory for CPU workers: keep freed blocks for reuse instead of handing them back.

glibc's malloc serves every block over 32 MiB (on a CPU batch: each layer's activations, the
feed-forward intermediate, eager attention maps) with a fresh mmap and unmaps it on free, so each
layer of each batch faults in and zeroes its memory again: on the bench corpus, 1.5M page faults
and a fifth of the run's time in the kernel. With mmap off and a high trim threshold, freed
blocks stay in the heap and the next batch reuses them (`make bench`, benchmarks/bench_extract.py
--cpu, prints the figures). The cost: the process's resident memory stays near its peak.

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
_M_MMAP_MAX = -4
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
        _done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    except (OSError, AttributeError):  # not the glibc we know: leave malloc as it is
        return False
    if not _done:
        log.debug("mallopt refused; host memory is handed back as usual")
    return _done
