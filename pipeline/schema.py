"""Table schemas, declared in `schemas/*.json` with a version, never inferred from data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from .errors import AttnpipeError

_TYPES = {
    "string": pa.string(), "bool": pa.bool_(), "int16": pa.int16(), "int32": pa.int32(),
    "int64": pa.int64(), "float32": pa.float32(), "list<float32>": pa.list_(pa.float32()),
}


def _schema_dir() -> Path:
    packaged = Path(__file__).parent / "_schemas"  # wheel install (pyproject force-include)
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "schemas"


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    description: str
    columns: tuple[dict, ...]
    partition_by: tuple[str, ...]
    sort_by: tuple[str, ...]

    @property
    def partitioned(self) -> bool:
        return bool(self.partition_by)

    def arrow(self) -> pa.Schema:
        """Columns stored in each file (partition keys live in the folder names)."""
        return pa.schema([pa.field(c["name"], _TYPES[c["type"]]) for c in self.columns
                          if not c.get("partition")])


@lru_cache(maxsize=None)
def load_schemas() -> dict[str, TableSchema]:
    schemas = {}
    for path in sorted(_schema_dir().glob("*.json")):
        d = json.loads(path.read_text())
        schemas[d["table"]] = TableSchema(d["table"], d["version"], d["description"],
                                          tuple(d["columns"]), tuple(d["partition_by"]),
                                          tuple(d["sort_by"]))
    return schemas


def table_schema(name: str) -> TableSchema:
    schemas = load_schemas()
    if name not in schemas:
        raise AttnpipeError(f"unknown table {name!r}; tables: {', '.join(schemas)}")
    return schemas[name]
