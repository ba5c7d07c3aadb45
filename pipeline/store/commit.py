"""Commit records: a shard exists if and only if its record `_commits/shard-NNNNN.json` exists.

The order of a commit: every file of the attempt is complete and fsynced in staging; the files
are renamed to their final names (which carry the attempt id, so they never replace anything);
then one atomic write of the record (temp file, fsync, rename, fsync of the folder) commits the
shard. A kill before the record leaves files that no record lists: readers that list files from
the records never see them, and the next run (holding the lock) deletes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import faults
from ..errors import OutputError
from . import paths
from .location import Location, as_location
from .writer import FileInfo

RECORD_VERSION = 1


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode()


def write_json(out: Location | Path | str, rel: str, data: dict, fault: str | None = None) -> None:
    """Write `rel` so that readers see either the old content or the new, never a part.
    `fault`: the fault-injection point just before the new content becomes visible."""
    as_location(out).write_atomic(rel, _json(data), before_rename=(lambda: faults.point(fault)) if fault else None)


def write_json_atomic(path: Path, data: dict, fault: str | None = None) -> None:
    """`write_json` for a local path."""
    write_json(Location(Path(path).parent), Path(path).name, data, fault)


def publish(out: Location | Path | str, staging: Path, files: list[FileInfo]) -> None:
    """Move an attempt's finished files from staging to their final names (an upload when the
    output is not local)."""
    loc = as_location(out)
    for f in files:
        loc.put(staging / f.path, f.path)
        faults.point("publish")
    loc.sync_dirs([f.path for f in files])


def unpublish(out: Location | Path | str, shard: int, attempt: str, files: list[FileInfo]) -> None:
    """After a failed publish or commit (disk full, ...): remove the attempt's files already
    moved to their final names, unless its record did get written. Best effort: the next run's
    recovery deletes whatever this leaves."""
    loc = as_location(out)
    rel = paths.record_rel(shard)
    try:
        if loc.isfile(rel) and json.loads(loc.read_text(rel)).get("attempt") == attempt:
            return
    except (OSError, ValueError):
        pass
    for f in files:
        try:
            loc.rm(f.path)
        except OSError:
            pass


def commit(out: Location | Path | str, shard: int, attempt: str, files: list[FileInfo], info: dict) -> dict:
    """Write the completion record of `shard`: from now on the shard exists."""
    record = {"record_version": RECORD_VERSION, "shard": shard, "attempt": attempt,
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "files": [f.to_dict() for f in files], **info}
    write_json(out, paths.record_rel(shard), record, fault="record")
    return record


def _parse_record(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise OutputError(f"commit record {where} cannot be read ({exc}); run 'attnpipe verify' "
                          "on the folder, or move the record away to redo its shard") from None
    if not isinstance(record, dict) or "files" not in record or "shard" not in record:
        raise OutputError(f"commit record {where} is not an attnpipe record; move it away")
    return record


def read_record(path: Path | str, out: Location | None = None) -> dict:
    """One record: a local path, or `path` relative to the location `out`."""
    loc, rel = (out, str(path)) if out is not None else (Location(Path(path).parent), Path(path).name)
    try:
        text = loc.read_text(rel)
    except OSError as exc:
        raise OutputError(f"commit record {loc.url(rel)} cannot be read ({exc}); run 'attnpipe verify' "
                          "on the folder, or move the record away to redo its shard") from None
    return _parse_record(text, loc.url(rel))


def record_names(out: Location | Path | str) -> list[str]:
    """Relative paths of the record files of `out`."""
    loc = as_location(out)
    return [f"{paths.COMMITS}/{n}" for n in loc.listdir(paths.COMMITS)
            if n.startswith("shard-") and n.endswith(".json")]


def read_records(out: Location | Path | str) -> dict[int, dict]:
    """Every committed shard of `out`: shard -> its record."""
    loc = as_location(out)
    records = {}
    for rel in record_names(loc):
        record = read_record(rel, loc)
        records[int(record["shard"])] = record
    return records


def committed_files(out: Location | Path | str, table: str | None = None,
                    records: dict[int, dict] | None = None) -> list:
    """The committed files of `table` (all tables when None), from the records: absolute Paths
    for a local output, URLs otherwise. This is how a reader sees only committed data: never
    by listing folders."""
    loc = as_location(out)
    records = read_records(loc) if records is None else records
    rels = [f["path"] for _, r in sorted(records.items()) for f in r["files"] if table is None or f["table"] == table]
    return [Path(loc.path(rel)) for rel in rels] if loc.local else [loc.url(rel) for rel in rels]


def remove_record(out: Location | Path | str, shard: int) -> None:
    """Un-commit a shard (its files go after): used only to redo a damaged shard, under the lock."""
    loc = as_location(out)
    loc.rm(paths.record_rel(shard))
    loc.sync_dirs([paths.record_rel(shard)])
