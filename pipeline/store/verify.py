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
from . import verified
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

# sha256 runs at about 1 GB/s here; above this many bytes per open, the rest get size checks only
# this time (`attnpipe verify` hashes everything). Files verified before are not hashed again
# (verified.py remembers them across processes).
HASH_BUDGET = 2 << 30


def check_committed(out: Location | Path | str, records: dict[int, dict], budget: int = HASH_BUDGET) -> int:
    """Before a reader trusts the committed files of a local output: each present with its
    recorded size and, for the first `budget` bytes not yet verified in this process, its sha256.
    Raises OutputError (one line: damaged, and that `attnpipe verify` tells more). Returns the
    bytes hashed."""
    loc = as_location(out)
    if not loc.local:
        return 0
    hashed, root = 0, Path(loc.root)
    verified.load(root)
    for _, record in sorted(records.items()):
        for f in record["files"]:
            path = Path(loc.path(f["path"]))
            try:
                key = verified.key(path, f["sha256"])
            except OSError:
                raise _damaged(loc, f"{f['path']} is missing") from None
            if key[1] != f["bytes"]:
                raise _damaged(loc, f"{f['path']} has {key[1]} bytes, its record says {f['bytes']}")
            if verified.known(key) or hashed + key[1] > budget:
                continue
            hashed += key[1]
            if not verified.check(path, f["sha256"], key):
                raise _damaged(loc, f"{f['path']} differs from its record's sha256")
    if hashed:
        verified.save(root)
    return hashed


def _damaged(loc: Location, what: str) -> OutputError:
    return OutputError(f"the data of {loc} is damaged ({what}); 'attnpipe verify {loc}' tells more")


def parquet_format():
    """pyarrow's Parquet format with page checksums verified on read (files written since
    attnpipe wrote them carry CRCs; older files have none and read as before)."""
    import pyarrow.dataset as pads

    return pads.ParquetFileFormat(
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(page_checksum_verification=True))
