"""Committed files already checked against their records' sha256, remembered.

Committed files never change (their names carry the attempt), so a file hashed once is trusted
while its path, size, mtime and inode stay the same: in this process, and across processes
through a small file per dataset in the user's cache ($ATTNPIPE_CACHE, default ~/.cache/attnpipe).
Readers and reruns both use it, so a large dataset is hashed once, not on every command.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .writer import sha256_of

_VERIFIED: set[tuple] = set()
_LOADED: set[str] = set()  # roots whose cache file this process has read


def _file(root: Path) -> Path:
    base = Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe")
    return base / "verified" / (hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] + ".json")


def load(root: Path) -> None:
    """Add what earlier processes verified under `root` (read once per process)."""
    if str(root.resolve()) in _LOADED:
        return
    _LOADED.add(str(root.resolve()))
    try:
        _VERIFIED.update(tuple(k) for k in json.loads(_file(root).read_text()))
    except (OSError, ValueError, TypeError):
        pass  # no cache yet, or unreadable: hash again


def save(root: Path) -> None:
    path, prefix = _file(root), str(root.resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(list(k) for k in _VERIFIED if k[0].startswith(prefix))))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs hashing again next time


def key(path: Path, sha256: str) -> tuple:
    """What identifies a verified file; raises OSError when it is missing."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, sha256)


def known(k: tuple) -> bool:
    return k in _VERIFIED


def check(path: Path, sha256: str, k: tuple | None = None) -> bool:
    """Whether `path` hashes to `sha256`; remembered when it does."""
    k = k or key(path, sha256)
    if k in _VERIFIED:
        return True
    if sha256_of(path) != sha256:
        return False
    _VERIFIED.add(k)
    return True
