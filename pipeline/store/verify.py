"""`attnpipe verify OUT`: every committed file against its record (presence, size, sha256, rows,
schema), and every file that no record lists (leftovers of killed attempts, strays)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import paths
from ..errors import OutputError
from .commit import read_record
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


def _check_file(out: Path, f: dict, weight_dtype: str) -> str | None:
    path = out / f["path"]
    if not path.is_file():
        return f"{f['path']}: missing"
    if path.stat().st_size != f["bytes"]:
        return f"{f['path']}: {path.stat().st_size} bytes, the record says {f['bytes']}"
    if sha256_of(path) != f["sha256"]:
        return f"{f['path']}: checksum differs from the record (the file was changed or damaged)"
    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        return f"{f['path']}: not readable as Parquet ({exc})"
    if meta.num_rows != f["rows"]:
        return f"{f['path']}: {meta.num_rows} rows, the record says {f['rows']}"
    declared = table_schema(f["table"]).arrow(weight_dtype)
    got = schema.remove_metadata()
    if not all(got.field(i).equals(declared.field(i)) for i in range(len(declared))) or len(got) < len(declared):
        return f"{f['path']}: columns differ from the declared {f['table']} schema"
    return None


def verify(out: Path) -> Report:
    out = Path(out)
    check_format(out)
    info = read_info(out)
    weight_dtype = (info or {}).get("job", {}).get("run", {}).get("weight_dtype", "bfloat16")
    report = Report(out)
    records = {}
    for path in sorted((out / paths.COMMITS).glob("shard-*.json")) if (out / paths.COMMITS).is_dir() else []:
        try:
            record = read_record(path)
            records[int(record["shard"])] = record
        except OutputError as exc:
            report.problems.append(f"{path.name}: {exc}")
    listed = set()
    for shard, record in sorted(records.items()):
        for f in record["files"]:
            listed.add(f["path"])
            report.checked += 1
            problem = _check_file(out, f, weight_dtype)
            if problem:
                report.problems.append(f"shard {shard}: {problem}")
    for f in data_files(out):
        rel = str(f.relative_to(out))
        if rel not in listed:
            kind = "left by an uncommitted attempt" if paths.DATA_FILE.match(f.name) else "not written by attnpipe"
            report.strays.append(f"{rel}: {kind}")
    if (out / paths.STAGING).exists():
        report.strays.append(f"{paths.STAGING}/: staging of an attempt in progress or killed")
    return report
