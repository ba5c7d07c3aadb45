"""Shard writer: collects a shard's rows per table and layer, then writes sorted, zstd Parquet
files to a staging folder and renames them into place only when the whole shard is done."""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .paths import staging_dir, table_file
from .schema import table_schema

ROW_GROUP = 64_000  # small enough that min/max statistics on doc_id/head skip most of a file


class ShardWriter:
    """Context manager: `write_batch(table, columns, layer)` any number of times, then
    `finalize()` -> rows per table. Leaving the block with an error discards the shard."""

    def __init__(self, out: Path, shard: int, provenance: dict):
        self.out, self.shard = Path(out), shard
        self.staging = staging_dir(self.out, shard)
        self.provenance = json.dumps(provenance, sort_keys=True, default=str)
        self.parts: dict[tuple[str, int | None], list[pa.Table]] = defaultdict(list)
        self.extra: dict[str, pa.Schema] = {}

    def __enter__(self) -> "ShardWriter":
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.staging.parent.rmdir()  # only when no other shard is staging beside this one
        except OSError:
            pass

    def schema(self, table: str) -> pa.Schema:
        declared = table_schema(table)
        schema = declared.arrow()
        for field in self.extra.get(table, []):
            schema = schema.append(field)
        return schema.with_metadata({
            "attnpipe.table": table, "attnpipe.schema_version": str(declared.version),
            "attnpipe.provenance": self.provenance})

    def write_batch(self, table: str, columns: dict, layer: int | None = None,
                    extra: pa.Schema | None = None) -> None:
        """Add rows; `extra` declares passthrough columns beyond the table's schema."""
        if extra is not None:
            self.extra[table] = extra
        self.parts[(table, layer)].append(pa.Table.from_pydict(columns, schema=self.schema(table)))

    def finalize(self) -> dict[str, int]:
        """Write every (table, layer) file sorted, then move them into place. Rows per table."""
        rows: dict[str, int] = defaultdict(int)
        staged = []
        for (table, layer), parts in sorted(self.parts.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            data = pa.concat_tables(parts)
            data = data.sort_by([(c, "ascending") for c in table_schema(table).sort_by if c in data.column_names])
            rel = table_file(table, self.shard, layer)
            (self.staging / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(data, self.staging / rel, compression="zstd", row_group_size=ROW_GROUP)
            staged.append(rel)
            rows[table] += data.num_rows
        for rel in staged:  # every file is complete before the first becomes visible
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / rel, self.out / rel)
        self.files = [str(rel) for rel in staged]
        return dict(rows)
