"""Commit records: a shard exists if and only if its record `_commits/shard-NNNNN.json` exists.

The order of a commit: every file of the attempt is complete and fsynced in staging; the files
are renamed to their final names (which carry the attempt id, so they never replace anything);
then one atomic write of the record (temp file, fsync, rename, fsync of the folder) commits the
shard. A kill before the record leaves files that no record lists: readers that list files from
the records never see them, and the next run (holding the lock) deletes them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path, PurePosixPath

from .. import faults
from ..errors import OutputError
from . import paths
from .location import Location, as_location
from .writer import FileInfo

RECORD_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    problem = record_problem(record)
    if problem:
        raise OutputError(f"commit record {where}: {problem}; move the record away to redo its shard")
    return record


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _file_problem(i: int, f) -> str | None:
    """What is wrong with entry `i` of a record's files, if anything."""
    from .schema import load_schemas

    if not isinstance(f, dict):
        return f"files[{i}] must be an object, got {json.dumps(f)}"
    for key, ok, valid in (("table", lambda v: v in load_schemas(), f"one of {', '.join(load_schemas())}"),
                           ("path", lambda v: isinstance(v, str), "a relative path"),
                           ("rows", _count, "a count"), ("bytes", _count, "a count"),
                           ("sha256", lambda v: isinstance(v, str) and _SHA256.match(v), "64 hex digits"),
                           ("layer", lambda v: v is None or _count(v), "a layer number or null"),
                           ("recipe", lambda v: v is None or _count(v), "a recipe index or null")):
        if key not in f:
            return f"files[{i}] has no key '{key}'"
        if not ok(f[key]):
            return f"files[{i}].{key} must be {valid}, got {json.dumps(f[key])}"
    path = PurePosixPath(f["path"])
    # Readers open exactly these paths: nothing outside the table's own folder, never '..'.
    if path.parts[:1] != (f["table"],) or ".." in path.parts or not paths.DATA_FILE.match(path.name):
        return f"files[{i}].path {json.dumps(f['path'])} is not a data file of table {f['table']!r}"
    return None


def record_problem(record: dict) -> str | None:
    """The first thing that makes `record` unusable, naming the key; None for a sound record.
    Checks types, that no file is listed twice, and that the totals agree with the files."""
    if not _count(record["shard"]):
        return f"key 'shard' must be a shard number, got {json.dumps(record['shard'])}"
    files = record["files"]
    if not isinstance(files, list):
        return f"key 'files' must be a list of file entries, got {json.dumps(files)}"
    seen: set[str] = set()
    for i, f in enumerate(files):
        problem = _file_problem(i, f)
        if problem:
            return problem
        if f["path"] in seen:
            return f"files[{i}] lists {f['path']} a second time"
        seen.add(f["path"])
    return _totals_problem(record)


def _totals_problem(record: dict) -> str | None:
    """Totals that disagree with the files' rows (an edited record would change `status`)."""
    per_table: dict[str, int] = {}
    for f in record["files"]:
        per_table[f["table"]] = per_table.get(f["table"], 0) + f["rows"]
    rows = record.get("rows", per_table)
    if not isinstance(rows, dict) or not all(_count(v) for v in rows.values()):
        return f"key 'rows' must map tables to row counts, got {json.dumps(rows)}"
    for table in sorted(set(rows) | set(per_table)):
        if rows.get(table, 0) != per_table.get(table, 0):
            return f"rows.{table} is {rows.get(table, 0)} but its files hold {per_table.get(table, 0)} rows"
    for key, table in (("documents", "documents"), ("tokens", "tokens")):
        if key in record and record[key] != per_table.get(table, 0):
            return f"key '{key}' is {json.dumps(record[key])} but its {table} files hold {per_table.get(table, 0)} rows"
    for key in ("empty_documents", "windows", "repeated_texts"):
        if key in record and not _count(record[key]):
            return f"key '{key}' must be a count, got {json.dumps(record[key])}"
    return None


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
    records: dict[int, dict] = {}
    owner: dict[str, str] = {}  # data file -> the record listing it
    for rel in sorted(record_names(loc)):
        record = read_record(rel, loc)
        if PurePosixPath(rel).name != f"{paths.shard_name(record['shard'])}.json":
            raise OutputError(f"commit record {loc.url(rel)}: key 'shard' is {record['shard']}, not the shard "
                              "of its file name; move the record away to redo its shard")
        for f in record["files"]:
            if f["path"] in owner:
                raise OutputError(f"commit records {owner[f['path']]} and {PurePosixPath(rel).name} both list "
                                  f"{f['path']}; move the newer record away to redo its shard")
            owner[f["path"]] = PurePosixPath(rel).name
        records[record["shard"]] = record
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
