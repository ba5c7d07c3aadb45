"""`attnpipe verify OUT`: every commit record (its keys, no file listed twice, totals that agree
with its files), every committed file against its record (presence, size, sha256, rows, schema),
`_dataset.json`, and every file that no record lists (leftovers of killed attempts, strays).
A path that is not an attnpipe output fails with one line.

`check_committed` is the readers' cheaper check before they trust the files (sizes always,
sha256 within a budget, cached in the process); `parquet_format` verifies page checksums on
pyarrow reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from . import paths
from ..errors import OutputError
from .commit import read_record, record_names
from .location import Location, as_location
from .dataset import check_format, data_files, read_info
from .schema import table_schema
from .writer import sha256_of


@dataclass
class Report:
    out: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)  # damage: the data is not what was committed
    strays: list[str] = field(default_factory=list)  # files no record lists

    @property
    def ok(self) -> bool:
        return not self.problems and not self.strays


def _check_file(loc: Location, f: dict, weight_dtype: str) -> str | None:
    rel = f["path"]
    if not loc.isfile(rel):
        return f"{rel}: missing"
    if loc.size(rel) != f["bytes"]:
        return f"{rel}: {loc.size(rel)} bytes, the record says {f['bytes']}"
    with loc.open(rel) as fh:
        if sha256_of(fh) != f["sha256"]:
            return f"{rel}: checksum differs from the record (the file was changed or damaged)"
    try:
        with loc.open(rel) as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        return f"{rel}: not readable as Parquet ({exc})"
    if meta.num_rows != f["rows"]:
        return f"{rel}: {meta.num_rows} rows, the record says {f['rows']}"
    declared = table_schema(f["table"]).arrow(weight_dtype)
    got = schema.remove_metadata()
    if len(got) < len(declared) or not all(got.field(i).equals(declared.field(i)) for i in range(len(declared))):
        return f"{rel}: columns differ from the declared {f['table']} schema"
    return None


def _readable_records(loc: Location, report: Report) -> dict[int, dict]:
    """The records that pass their own checks; the others become problems, by record file."""
    records: dict[int, dict] = {}
    owner: dict[str, str] = {}
    for rel in sorted(record_names(loc)):
        name = PurePosixPath(rel).name
        try:
            record = read_record(rel, loc)
        except OutputError as exc:
            report.problems.append(f"{name}: {exc}")
            continue
        if name != f"{paths.shard_name(record['shard'])}.json":
            report.problems.append(f"{name}: key 'shard' is {record['shard']}, not the shard of its file name")
            continue
        twice = [f["path"] for f in record["files"] if f["path"] in owner]
        if twice:
            report.problems.append(f"{name}: lists {twice[0]}, which {owner[twice[0]]} lists too")
        owner.update({f["path"]: name for f in record["files"]})
        records[record["shard"]] = record
    return records


def _check_folder(loc: Location) -> None:
    """One line for a path that is not an attnpipe output at all (verify must not pass on it)."""
    if not loc.exists():
        raise OutputError(f"{loc} does not exist; give the output folder of an attnpipe run")
    if not loc.isdir():
        raise OutputError(f"{loc} is not a folder; give the output folder of an attnpipe run")
    check_format(loc)
    if not loc.isfile(paths.DATASET) and not record_names(loc):
        raise OutputError(f"{loc} is not an attnpipe output (no {paths.DATASET} and no commit records); "
                          "nothing to verify")


def _read_info(loc: Location, report: Report) -> dict:
    """`_dataset.json`, or {} with the problem reported: without it a rerun cannot resume."""
    try:
        info = read_info(loc)
    except OutputError as exc:
        report.problems.append(str(exc))
        return {}
    if info is None:
        report.problems.append(f"{paths.DATASET}: missing (it says which job wrote the data; a rerun "
                               "cannot resume without it)")
        return {}
    if not isinstance(info, dict) or not isinstance(info.get("job"), dict):
        report.problems.append(f"{paths.DATASET}: not an attnpipe dataset description (no 'job')")
        return {}
    return info


def verify(out: Location | Path | str) -> Report:
    loc = as_location(out)
    _check_folder(loc)
    report = Report(Path(loc.root) if loc.local else loc.url())
    info = _read_info(loc, report)
    weight_dtype = (info.get("job") or {}).get("run", {}).get("weight_dtype", "bfloat16")
    records = _readable_records(loc, report)
    listed = set()
    for shard, record in sorted(records.items()):
        for f in record["files"]:
            listed.add(f["path"])
            report.checked += 1
            problem = _check_file(loc, f, weight_dtype)
            if problem:
                report.problems.append(f"shard {shard}: {problem}")
    for rel in data_files(loc):
        if rel not in listed:
            kind = ("left by an uncommitted attempt" if paths.DATA_FILE.match(PurePosixPath(rel).name)
                    else "not written by attnpipe")
            report.strays.append(f"{rel}: {kind}")
    if loc.exists(paths.STAGING):
        report.strays.append(f"{paths.STAGING}/: staging of an attempt in progress or killed")
    return report


# --- the readers' check: cheap enough to run before every read -----------------------------------

# Committed files never change (their names carry the attempt), so a file hashed once is trusted
# while its size, mtime and inode stay the same: in this process, and across processes through a
# small file per dataset in the user's cache ($ATTNPIPE_CACHE, default ~/.cache/attnpipe), so a
# large dataset is hashed once, a budget's worth per command, not on every query.
_VERIFIED: set[tuple] = set()
# sha256 runs at about 1 GB/s here; above this many bytes per open, the rest get size checks only
# this time (`attnpipe verify` hashes everything).
HASH_BUDGET = 2 << 30


def _verified_file(root: Path) -> Path:
    import hashlib
    import os

    base = Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe")
    return base / "verified" / (hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16] + ".json")


def _load_verified(root: Path) -> None:
    import json

    try:
        _VERIFIED.update(tuple(k) for k in json.loads(_verified_file(root).read_text()))
    except (OSError, ValueError, TypeError):
        pass  # no cache yet, or unreadable: hash again


def _save_verified(root: Path) -> None:
    import json
    import os

    path = _verified_file(root)
    prefix = str(root.resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(list(k) for k in _VERIFIED if k[0].startswith(prefix))))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs hashing again next time


def check_committed(out: Location | Path | str, records: dict[int, dict], budget: int = HASH_BUDGET) -> int:
    """Before a reader trusts the committed files of a local output: each present with its
    recorded size and, for the first `budget` bytes not yet verified in this process, its sha256.
    Raises OutputError (one line: damaged, and that `attnpipe verify` tells more). Returns the
    bytes hashed."""
    loc = as_location(out)
    if not loc.local:
        return 0
    hashed, root = 0, Path(loc.root)
    _load_verified(root)
    for _, record in sorted(records.items()):
        for f in record["files"]:
            path = Path(loc.path(f["path"])).resolve()
            try:
                st = path.stat()
            except OSError:
                raise _damaged(loc, f"{f['path']} is missing") from None
            if st.st_size != f["bytes"]:
                raise _damaged(loc, f"{f['path']} has {st.st_size} bytes, its record says {f['bytes']}")
            key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, f["sha256"])
            if key in _VERIFIED or hashed + st.st_size > budget:
                continue
            hashed += st.st_size
            if sha256_of(path) != f["sha256"]:
                raise _damaged(loc, f"{f['path']} differs from its record's sha256")
            _VERIFIED.add(key)
    if hashed:
        _save_verified(root)
    return hashed


def _damaged(loc: Location, what: str) -> OutputError:
    return OutputError(f"the data of {loc} is damaged ({what}); 'attnpipe verify {loc}' tells more")


def parquet_format():
    """pyarrow's Parquet format with page checksums verified on read (files written since
    attnpipe wrote them carry CRCs; older files have none and read as before)."""
    import pyarrow.dataset as pads

    return pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(page_checksum_verification=True))
