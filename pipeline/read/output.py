"""Results of the read commands as an aligned table (for people), CSV, JSON or Parquet.

Results are streamed batch by batch, so `attnpipe query OUT "SELECT * FROM edges" --format
parquet -o edges.parquet` does not hold the result in memory. The aligned table shows the first
`max_rows` rows and says how many there were.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import IO

import pyarrow as pa

from ..errors import ReadError
from ..store.paths import DATASET, VERSION_DIR

FORMATS = ("table", "csv", "json", "parquet")
TEXT_WIDTH = 40  # longest string cell in the aligned table before it is cut with '…' (0: never)
SIGNIFICANT = 4  # digits of a float column's largest value; the column shares its decimals


def refuse_inside(out: str | Path | None, dataset: str | Path) -> None:
    """-o never writes into a dataset folder (a commit record or data file replaced would be
    read as committed data): refuse any path inside it, symlinks resolved. A version folder
    (OUT/v2) protects its parent output too."""
    if out is None:
        return
    target = Path(out).resolve()
    roots = [Path(dataset).resolve()]
    if VERSION_DIR.match(roots[0].name) and (roots[0].parent / DATASET).exists():
        roots.append(roots[0].parent)
    for root in roots:
        if target == root or root in target.parents:
            raise ReadError(f"refusing to write {out}: it is inside the dataset folder {root}; "
                            "write results outside it")


def write_result(reader: pa.RecordBatchReader, fmt: str = "table", out: str | Path | None = None,
                 max_rows: int = 100, max_width: int = TEXT_WIDTH) -> int:
    """Write every row of `reader` as `fmt` to `out` (stdout when None). Returns the row count.
    A file appears only complete: written beside, then renamed over `out`."""
    if fmt not in FORMATS:
        raise ReadError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise ReadError("--format parquet writes a file: give it with -o/--out FILE.parquet")
    if out is None:
        binary = fmt == "csv"
        sink = sys.stdout.buffer if binary else sys.stdout
        try:
            return _write(reader, fmt, sink, max_rows, max_width)
        finally:
            sink.flush()
    out = Path(out)
    if not out.parent.is_dir():
        raise ReadError(f"cannot write {out}: folder {out.parent} does not exist")
    # A temp file then a rename: never writes through a link to another file, never leaves half a result.
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        if fmt == "parquet":
            rows = _write_parquet(reader, tmp)
        else:
            with open(tmp, "wb" if fmt == "csv" else "w", encoding=None if fmt == "csv" else "utf-8") as sink:
                rows = _write(reader, fmt, sink, max_rows, max_width)
        os.replace(tmp, out)
    except OSError as exc:
        raise ReadError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def _write(reader: pa.RecordBatchReader, fmt: str, sink: IO, max_rows: int, max_width: int) -> int:
    if fmt == "table":
        return _write_table(reader, sink, max_rows, max_width)
    return {"csv": _write_csv, "json": _write_json}[fmt](reader, sink)


def _write_parquet(reader: pa.RecordBatchReader, out: Path) -> int:
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(out, reader.schema, compression="zstd", write_page_checksum=True) as writer:
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


def _cell(v, max_width: int = TEXT_WIDTH) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.{SIGNIFICANT}g}"
    if isinstance(v, list):
        inner = ", ".join(_cell(x, max_width) for x in v[:4])
        return f"[{inner}{', …' if len(v) > 4 else ''}] ({len(v)})"
    text = str(v).replace("\n", " ")
    return text if max_width <= 0 or len(text) <= max_width else text[:max_width - 1] + "…"


def float_column(values: list) -> list[str]:
    """A float column's cells with the same number of decimals (the largest value keeps
    SIGNIFICANT digits), so that right-aligned cells line up on the decimal point; scientific
    notation for all when the magnitudes need it."""
    finite = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    top = max(finite, default=0.0)
    if top and (top >= 1e6 or top < 1e-3):
        fmt = f".{SIGNIFICANT - 1}e"
    else:
        magnitude = math.floor(math.log10(top)) if top else 0
        fmt = f".{max(0, min(SIGNIFICANT - 1 - magnitude, 8))}f"
    return ["NULL" if v is None else (f"{v:{fmt}}" if math.isfinite(v) else str(v)) for v in values]


def _write_table(reader: pa.RecordBatchReader, sink: IO, max_rows: int, max_width: int = TEXT_WIDTH) -> int:
    names = reader.schema.names
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in reader.schema]
    floats = [pa.types.is_floating(f.type) for f in reader.schema]
    raw: list[list] = [[] for _ in names]  # the shown rows, column by column
    shown = rows = 0
    for batch in reader:
        if max_rows <= 0 or shown < max_rows:
            take = batch if max_rows <= 0 else batch.slice(0, max_rows - shown)
            for i, col in enumerate(take.columns):
                raw[i] += col.to_pylist()
            shown += take.num_rows
        rows += batch.num_rows
    columns = [float_column(vals) if is_float else [_cell(v, max_width) for v in vals]
               for vals, is_float in zip(raw, floats)]
    cells = [list(r) for r in zip(*columns)]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]

    def line(values):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(values, widths, numeric)).rstrip()

    sink.write(line(names) + "\n")
    sink.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        sink.write(line(r) + "\n")
    if rows > shown:
        sink.write(f"({shown:,} of {rows:,} rows shown; --max-rows 0 shows all, "
                   "--format csv/json/parquet writes all)\n")
    else:
        sink.write(f"({rows:,} row{'s' if rows != 1 else ''})\n")
    return rows
