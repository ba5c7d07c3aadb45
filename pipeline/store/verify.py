"""`attnpipe verify OUT`: every committed file against its record (presence, size, sha256, rows,
schema), and every file that no record lists (leftovers of killed attempts, strays)."""

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
    if not all(got.field(i).equals(declared.field(i)) for i in range(len(declared))) or len(got) < len(declared):
        return f"{rel}: columns differ from the declared {f['table']} schema"
    return None


def verify(out: Location | Path | str) -> Report:
    loc = as_location(out)
    check_format(loc)
    info = read_info(loc)
    weight_dtype = (info or {}).get("job", {}).get("run", {}).get("weight_dtype", "bfloat16")
    report = Report(Path(loc.root) if loc.local else loc.url())
    records = {}
    for rel in record_names(loc):
        try:
            record = read_record(rel, loc)
            records[int(record["shard"])] = record
        except OutputError as exc:
            report.problems.append(f"{PurePosixPath(rel).name}: {exc}")
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
