"""Fault injection for the crash tests: `ATTNPIPE_FAULT=point[:n]` SIGKILLs this process the
n-th time (default 1st) it reaches `faults.point(point)`. Unset, a point costs one dict lookup.

With `ATTNPIPE_FAULT_ONCE=FILE` only the first process to reach the point dies (it creates
FILE first): a Dask worker killed mid-shard is replaced, and the retry must succeed.
`ATTNPIPE_FAIL_SHARD=N` makes shard N raise at its start, every attempt (a shard that keeps failing).
`ATTNPIPE_FAULT_SIGNAL=TERM` (or INT) sends that signal instead of SIGKILL: a scheduler's stop or a
Ctrl-C at a known point, which the run must survive cleanly.

Points: load (model loaded), batch (a batch's rows handed to the writer), publish (a file renamed
into place), record (a record written but not yet renamed), commit (a shard committed), last
(every shard committed, before the manifest and the lock are released).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("ATTNPIPE_FAULT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_ONCE = os.environ.get("ATTNPIPE_FAULT_ONCE", "")
_FAIL_SHARD = os.environ.get("ATTNPIPE_FAIL_SHARD", "")
_SIGNAL = getattr(signal, "SIG" + os.environ.get("ATTNPIPE_FAULT_SIGNAL", "KILL").upper().removeprefix("SIG"))
_SEEN = {"n": 0}


def point(name: str) -> None:
    if _NAME != name or _SEEN.get("signalled"):
        return
    _SEEN["n"] += 1
    if _SEEN["n"] >= int(_NTH or 1):
        if _ONCE:
            try:
                os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        _SEEN["signalled"] = True  # a signal it survives is sent once
        os.kill(os.getpid(), _SIGNAL)


def shard_start(shard: int) -> None:
    if _FAIL_SHARD and int(_FAIL_SHARD) == shard:
        raise RuntimeError(f"injected failure of shard {shard} (ATTNPIPE_FAIL_SHARD)")
