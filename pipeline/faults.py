"""Fault injection for the crash tests: `ATTNPIPE_FAULT=point[:n]` SIGKILLs this process the
n-th time (default 1st) it reaches `faults.point(point)`. Unset, a point costs one dict lookup.

Points: load (model loaded), batch (a batch's rows handed to the writer), publish (a file renamed
into place), record (a record written but not yet renamed), commit (a shard committed), last
(every shard committed, before the manifest and the lock are released).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("ATTNPIPE_FAULT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_SEEN = {"n": 0}


def point(name: str) -> None:
    if _NAME != name:
        return
    _SEEN["n"] += 1
    if _SEEN["n"] >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
