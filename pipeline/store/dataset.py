"""An output folder as a dataset: which version a job writes to, whether it may, and the
clean-up of leftovers (only ever while holding the output's lock).

`_dataset.json` says what the data in a folder is (the job and its fingerprint). A folder with
no commit record yet holds nothing, so a corrected job may take it over; once a shard is
committed, a job with another fingerprint is refused with what changed, and `--new-run` writes
OUT/v2 (v3, ...) beside the old data, which stays readable.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path, PurePosixPath

from .. import __version__
from ..errors import OutputError
from . import paths
from .commit import read_records, remove_record, write_json
from .location import Location, as_location
from .schema import SCHEMA_VERSION

log = logging.getLogger("attnpipe")


def read_info(out: Location | Path | str) -> dict | None:
    loc = as_location(out)
    if not loc.isfile(paths.DATASET):
        return None
    try:
        return json.loads(loc.read_text(paths.DATASET))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{loc.url(paths.DATASET)} cannot be read ({exc}); move the folder away or choose "
                          "another --output") from None


def check_format(out: Location | Path | str) -> None:
    """Refuse folders written by attnpipe 0.1 (storage format 1), which had no commit records."""
    loc = as_location(out)
    if loc.isfile(paths.MANIFEST) and not loc.exists(paths.DATASET):
        try:
            version = json.loads(loc.read_text(paths.MANIFEST)).get("format_version", 1)
        except (OSError, ValueError):
            version = "unknown"
        if version != paths.FORMAT_VERSION:
            raise OutputError(f"{loc} was written by attnpipe 0.1 (storage format {version}, schema v1); this "
                              f"attnpipe reads and writes format {paths.FORMAT_VERSION} (schema v{SCHEMA_VERSION}): rerun the job "
                              "into another --output, or with --new-run to write beside the old data")


def versions(root: Location | Path | str) -> list[int]:
    """Versions present under an output folder: 1 is the folder itself, then v2, v3, ..."""
    loc = as_location(root)
    found = [1] if any(loc.exists(n) for n in (paths.DATASET, paths.COMMITS, paths.MANIFEST)) else []
    found += sorted(int(m.group(1)) for name in loc.listdir()
                    if (m := paths.VERSION_DIR.match(name)) and int(m.group(1)) > 1 and loc.isdir(name))
    return found


def version_location(root: Location, version: int) -> Location:
    return root if version == 1 else root.child(f"v{version}")


def choose_output(root: Location | Path | str, fingerprint: str, parts: dict, new_run: bool) -> Location:
    """The folder this job writes to: a new version where asked (`new_run`); else the latest
    version with the same fingerprint, or the latest one where nothing was committed yet;
    otherwise refuse, naming what changed."""
    from ..job import fingerprint_diff

    root = as_location(root)
    if root.exists() and not root.isdir():
        raise OutputError(f"output path {root} is a file; choose a folder for --output / run.output")
    present = versions(root)
    if not present:
        # A run killed before its first commit leaves only its lock, staging or a temp file of
        # _dataset.json: the folder is still ours.
        ours = (paths.LOCK, paths.STAGING, f".{paths.DATASET}.", f".{paths.MANIFEST}.")
        if any(n for n in root.listdir() if not paths.VERSION_DIR.match(n) and not n.startswith(ours)):
            raise OutputError(f"{root} exists, is not empty and is not an attnpipe output; choose another --output")
        return root
    if new_run:
        # Always a new version, also for an unchanged job whose corpus was edited or whose
        # weights were replaced in place (the refusals of those say to use --new-run); a rerun
        # without --new-run resumes the latest version with this fingerprint.
        latest = version_location(root, max(present))
        if latest.isfile(paths.DATASET) and not read_records(latest):
            return latest  # nothing committed there yet: take it over
        return version_location(root, max(present) + 1)
    for v in sorted(present, reverse=True):
        folder = version_location(root, v)
        check_format(folder)
        info = read_info(folder)
        if info and info.get("job_fingerprint") == fingerprint:
            return folder
        if info is None and _records_of_job(folder, fingerprint):
            log.warning("%s has no %s (deleted?); its commit records say it holds this job's data, so the run "
                        "continues there and writes it again", folder, paths.DATASET)
            return folder
    latest = version_location(root, max(present))
    check_format(latest)
    if not read_records(latest):
        return latest  # nothing committed: a corrected job may take the folder over
    info = read_info(latest) or {}
    changes = fingerprint_diff(info.get("fingerprint_parts", {}), parts) or ["(fingerprint only)"]
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    raise OutputError(f"{latest} holds data of a different job ({shown}); rerun with --new-run to write "
                      f"{version_location(root, max(present) + 1)} beside it (the old data stays readable), "
                      "or choose another --output")


def _records_of_job(folder: Location, fingerprint: str) -> bool:
    """Every commit record of `folder` was written by the job with this fingerprint."""
    records = read_records(folder)
    return bool(records) and all(r.get("job_fingerprint") == fingerprint for r in records.values())


def write_info(out: Location | Path | str, job_dict: dict, fingerprint: str, parts: dict, plan: dict) -> None:
    """Write `_dataset.json` (under the lock) when it is new, of another job, or the plan grew."""
    current = read_info(out)
    if current and current.get("job_fingerprint") == fingerprint and current.get("plan") == plan:
        return
    created = current.get("created") if current and current.get("job_fingerprint") == fingerprint else None
    write_json(out, paths.DATASET, {
        "format_version": paths.FORMAT_VERSION, "attnpipe_version": __version__,
        "job_fingerprint": fingerprint, "fingerprint_parts": parts, "job": job_dict, "plan": plan,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def planned_shards(info: dict | None) -> int | None:
    plan = (info or {}).get("plan")
    return len(plan["shards"]) if plan else None


def _committed_names(records: dict[int, dict]) -> set[str]:
    return {f["path"] for r in records.values() for f in r["files"]}


def data_files(out: Location | Path | str) -> list[str]:
    """Every file under the table folders (committed or not), relative to `out`, for clean-up
    and verify."""
    from .schema import load_schemas

    loc = as_location(out)
    return [rel for table in load_schemas() for rel in loc.find(table)]


def damaged_files(loc: Location, record: dict) -> list[str]:
    """Files of `record` that are missing, or whose size or sha256 differs from the record: a
    rerun redoes their shard. A local file verified before (by a reader or an earlier run) with
    the same size, mtime and inode is not hashed again; others are (about 1 GB/s)."""
    from . import verified
    from .writer import sha256_of

    def bad(f: dict) -> bool:
        if not loc.isfile(f["path"]) or loc.size(f["path"]) != f["bytes"]:
            return True
        if loc.local:
            return not verified.check(Path(loc.path(f["path"])), f["sha256"])
        with loc.open(f["path"]) as fh:
            return sha256_of(fh) != f["sha256"]

    if loc.local:
        verified.load(Path(loc.root))
    return [f["path"] for f in record["files"] if bad(f)]


def recover(out: Location | Path | str) -> dict[int, dict]:
    """Under the lock: delete what killed attempts left, un-commit shards whose files are gone
    or damaged (they will be redone), and warn about files attnpipe did not write."""
    loc = as_location(out)
    loc.rmtree(paths.STAGING)
    for name in loc.listdir(paths.COMMITS):
        if name.startswith(".") and name.endswith(".tmp"):
            loc.rm(f"{paths.COMMITS}/{name}")
    for name in loc.listdir():  # temp files of a run killed while writing _dataset.json or _manifest.json
        if name.startswith((f".{paths.DATASET}.", f".{paths.MANIFEST}.")) and name.endswith(".tmp"):
            loc.rm(name)
    records = read_records(loc)
    for shard, record in sorted(records.items()):
        damaged = damaged_files(loc, record)
        if damaged:
            log.warning("shard %d of %s is damaged (%s %s); it will be written again", shard, loc,
                        damaged[0], "is missing or differs from its record" if len(damaged) == 1
                        else f"and {len(damaged) - 1} more files are missing or differ from their record")
            remove_record(loc, shard)
            del records[shard]
    if loc.local:
        from . import verified

        verified.save(Path(loc.root))  # what this rerun hashed is not hashed again
    committed = _committed_names(records)
    removed, strays = 0, []
    for rel in data_files(loc):
        if rel in committed:
            continue
        if paths.DATA_FILE.match(PurePosixPath(rel).name):
            loc.rm(rel)
            removed += 1
        else:
            strays.append(rel)
    if removed:
        log.info("removed %d files of uncommitted attempts from %s", removed, loc)
    for rel in strays:
        log.warning("stray file %s in %s was not written by attnpipe; attnpipe ignores it, but readers "
                    "that glob the folder will read it", rel, loc)
    return records


def manifest(out: Location | Path | str, info: dict | None, records: dict[int, dict], num_shards: int) -> dict:
    """The summary `_manifest.json`, derived from the records (a cache for people; never truth)."""
    shards = {str(s): {k: r.get(k) for k in ("attempt", "committed_at", "documents", "empty_documents",
                                             "repeated_texts", "windows", "tokens", "rows", "seconds")}
              for s, r in sorted(records.items())}
    totals: dict = {k: sum(r.get(k) or 0 for r in records.values())
                    for k in ("documents", "empty_documents", "repeated_texts", "windows", "tokens")}
    rows: dict[str, int] = {}
    for r in records.values():
        for table, n in r.get("rows", {}).items():
            rows[table] = rows.get(table, 0) + n
    totals["rows"] = dict(sorted(rows.items()))
    latest = max(records.values(), key=lambda r: r.get("committed_at", ""), default={})
    return {"format_version": paths.FORMAT_VERSION, "job": (info or {}).get("job"),
            "job_fingerprint": (info or {}).get("job_fingerprint"), "num_shards": num_shards,
            "status": "complete" if len(records) >= num_shards else "partial",
            "committed": f"{len(records)}/{num_shards}", "shards": shards, "totals": totals,
            "provenance": latest.get("provenance", {})}


def write_manifest(out: Location | Path | str) -> dict:
    info = read_info(out)
    records = read_records(out)
    data = manifest(out, info, records, planned_shards(info) or len(records))
    write_json(out, paths.MANIFEST, data)
    return data
