"""Commit records: a shard exists if and only if its record `_commits/shard-NNNNN.json` exists.

The order of a commit: every file of the attempt is complete and fsynced in staging; the files
are renamed to their final names (which carry the attempt id, so they never replace anything);
then one atomic write of the record (temp file, fsync, rename, fsync of the folder) commits the
shard. A kill before the record leaves files that no record lists: readers that list files from
the records never see them, and the next run (holding the lock) deletes them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import faults
from ..errors import OutputError
from . import paths
from .writer import FileInfo

RECORD_VERSION = 1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict, fault: str | None = None) -> None:
    """Write `path` so that readers see either the old content or the new, never a part.
    `fault`: the fault-injection point between the temp file and its rename (commit records only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            faults.point(fault)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. the disk is full: leave no half-written temp file
        raise
    _fsync_dir(path.parent)


def publish(out: Path, staging: Path, files: list[FileInfo]) -> None:
    """Move an attempt's finished files from staging to their final names."""
    for f in files:
        target = out / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f.path, target)
        faults.point("publish")
    for folder in {(out / f.path).parent for f in files}:
        _fsync_dir(folder)


def unpublish(out: Path, shard: int, attempt: str, files: list[FileInfo]) -> None:
    """After a failed publish or commit (disk full, ...): remove the attempt's files already
    moved to their final names, unless its record did get written. Best effort: the next run's
    recovery deletes whatever this leaves."""
    path = paths.record_path(out, shard)
    try:
        if path.is_file() and json.loads(path.read_text()).get("attempt") == attempt:
            return
    except (OSError, ValueError):
        pass
    for f in files:
        try:
            (out / f.path).unlink(missing_ok=True)
        except OSError:
            pass


def commit(out: Path, shard: int, attempt: str, files: list[FileInfo], info: dict) -> dict:
    """Write the completion record of `shard`: from now on the shard exists."""
    record = {"record_version": RECORD_VERSION, "shard": shard, "attempt": attempt,
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "files": [f.to_dict() for f in files], **info}
    write_json_atomic(paths.record_path(out, shard), record, fault="record")
    return record


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"commit record {path} cannot be read ({exc}); run 'attnpipe verify' "
                          "on the folder, or move the record away to redo its shard") from None
    if not isinstance(record, dict) or "files" not in record or "shard" not in record:
        raise OutputError(f"commit record {path} is not an attnpipe record; move it away")
    return record


def read_records(out: Path) -> dict[int, dict]:
    """Every committed shard of `out`: shard -> its record."""
    folder = Path(out) / paths.COMMITS
    if not folder.is_dir():
        return {}
    records = {}
    for path in sorted(folder.glob("shard-*.json")):
        record = read_record(path)
        records[int(record["shard"])] = record
    return records


def committed_files(out: Path, table: str | None = None, records: dict[int, dict] | None = None
                    ) -> list[Path]:
    """Absolute paths of the committed files of `table` (all tables when None), from the records.
    This is how a reader sees only committed data: never by listing folders."""
    records = read_records(out) if records is None else records
    return [Path(out) / f["path"] for _, r in sorted(records.items()) for f in r["files"]
            if table is None or f["table"] == table]


def remove_record(out: Path, shard: int) -> None:
    """Un-commit a shard (its files go after): used only to redo a damaged shard, under the lock."""
    path = paths.record_path(out, shard)
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)
