"""Results of the read commands as an aligned table (for people), CSV, JSON or Parquet.

Results are streamed batch by batch, so `attnpipe query OUT "SELECT * FROM edges" --format
parquet -o edges.parquet` does not hold the result in memory. The aligned table shows the first
`max_rows` rows and says how many there were.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO

import pyarrow as pa

from ..errors import ReadError

FORMATS = ("table", "csv", "json", "parquet")
TEXT_WIDTH = 40  # longest string cell in the aligned table before it is cut with '…'


def write_result(reader: pa.RecordBatchReader, fmt: str = "table", out: str | Path | None = None,
                 max_rows: int = 100) -> int:
    """Write every row of `reader` as `fmt` to `out` (stdout when None). Returns the row count."""
    if fmt not in FORMATS:
        raise ReadError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if fmt == "parquet":
        if out is None:
            raise ReadError("--format parquet writes a file: give it with -o/--out FILE.parquet")
        return _write_parquet(reader, Path(out))
    if out is not None and not Path(out).parent.is_dir():
        raise ReadError(f"cannot write {out}: folder {Path(out).parent} does not exist")
    binary = fmt == "csv"
    try:
        sink: IO = open(out, "wb" if binary else "w", encoding=None if binary else "utf-8") if out else \
            (sys.stdout.buffer if binary else sys.stdout)
    except OSError as exc:
        raise ReadError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        writer = {"table": _write_table, "csv": _write_csv, "json": _write_json}[fmt]
        return writer(reader, sink, max_rows) if fmt == "table" else writer(reader, sink)
    finally:
        if out:
            sink.close()
        else:
            sink.flush()


def _write_parquet(reader: pa.RecordBatchReader, out: Path) -> int:
    import pyarrow.parquet as pq

    if not out.parent.is_dir():
        raise ReadError(f"cannot write {out}: folder {out.parent} does not exist")
    rows = 0
    with pq.ParquetWriter(out, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _flat(batch: pa.RecordBatch) -> pa.RecordBatch:
    """List and struct columns (maps.weights) as JSON text, which CSV can hold."""
    columns, changed = [], False
    for col, field in zip(batch.columns, batch.schema):
        if pa.types.is_nested(field.type):
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
            changed = True
        columns.append(col)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names) if changed else batch


def _write_csv(reader: pa.RecordBatchReader, sink: IO) -> int:
    import pyarrow.csv as pacsv

    rows, writer = 0, None
    for batch in reader:
        batch = _flat(batch)
        if writer is None:
            writer = pacsv.CSVWriter(sink, batch.schema)
        writer.write_batch(batch)
        rows += batch.num_rows
    if writer is None:  # no rows: still a header line
        sink.write((",".join(f'"{n}"' for n in reader.schema.names) + "\n").encode())
    else:
        writer.close()
    return rows


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # NaN/inf are not JSON
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def _write_json(reader: pa.RecordBatchReader, sink: IO) -> int:
    """A JSON array of objects, one per row, written row by row."""
    rows = 0
    sink.write("[")
    for batch in reader:
        for row in batch.to_pylist():
            sink.write(("\n" if rows == 0 else ",\n") +
                       json.dumps({k: _json_value(v) for k, v in row.items()}, default=str))
            rows += 1
    sink.write("\n]\n" if rows else "]\n")
    return rows


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        inner = ", ".join(_cell(x) for x in v[:4])
        return f"[{inner}{', …' if len(v) > 4 else ''}] ({len(v)})"
    text = str(v).replace("\n", " ")
    return text if len(text) <= TEXT_WIDTH else text[:TEXT_WIDTH - 1] + "…"


def _write_table(reader: pa.RecordBatchReader, sink: IO, max_rows: int) -> int:
    names = reader.schema.names
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in reader.schema]
    shown, rows = [], 0
    for batch in reader:
        if max_rows <= 0 or len(shown) < max_rows:
            take = batch if max_rows <= 0 else batch.slice(0, max_rows - len(shown))
            columns = [[_cell(v) for v in col.to_pylist()] for col in take.columns]
            shown += [list(r) for r in zip(*columns)]
        rows += batch.num_rows
    widths = [max([len(n)] + [len(r[i]) for r in shown]) for i, n in enumerate(names)]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    sink.write(line(names) + "\n")
    sink.write("  ".join("-" * w for w in widths) + "\n")
    for r in shown:
        sink.write(line(r) + "\n")
    if rows > len(shown):
        sink.write(f"({len(shown):,} of {rows:,} rows shown; --max-rows 0 shows all, "
                   "--format csv/json/parquet writes all)\n")
    else:
        sink.write(f"({rows:,} row{'s' if rows != 1 else ''})\n")
    return rows
