"""Table schemas, declared in `schemas/*.json` with a version, never inferred from data.

Attention values (edge weights, map rows, head statistics) are declared with the type `value`,
stored at the job's `run.weight_dtype`: bfloat16 by default (a float32 column whose values are
rounded to 8 significant bits and byte-stream-split, so that zstd drops the zero bits: the
smallest files, readable everywhere float32 is); float16 (3 significant digits, a float16
column); float32 (as computed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from ..errors import AttnpipeError

SCHEMA_VERSION = 4  # every table's version; bumped together when the on-disk format changes
WEIGHT_TYPES = {"float16": pa.float16(), "bfloat16": pa.float32(), "float32": pa.float32()}
_TYPES = {
    "string": pa.string(), "bool": pa.bool_(), "int16": pa.int16(), "int32": pa.int32(),
    "int64": pa.int64(), "float32": pa.float32(),
}


def _arrow_type(name: str, weight_dtype: str) -> pa.DataType:
    if name == "value":
        return WEIGHT_TYPES[weight_dtype]
    if name == "list<value>":
        return pa.list_(WEIGHT_TYPES[weight_dtype])
    return _TYPES[name]


def _schema_dir() -> Path:
    packaged = Path(__file__).parent.parent / "_schemas"  # wheel install (pyproject force-include)
    return packaged if packaged.is_dir() else Path(__file__).parents[2] / "schemas"


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    description: str
    columns: tuple[dict, ...]
    layer_folders: bool  # one folder per layer (layer-000, ...); `layer` is also a column
    sort_by: tuple[str, ...]  # order of rows inside a row group
    # a row group never mixes values of these (cheap head filters); rows the model produced are
    # grouped by bands of heads instead, each with a run of documents (store/runs.py)
    row_group_by: tuple[str, ...]

    @property
    def column_names(self) -> list[str]:
        return [c["name"] for c in self.columns]

    @property
    def value_columns(self) -> list[str]:
        """Columns stored at the job's weight precision."""
        return [c["name"] for c in self.columns if c["type"] in ("value", "list<value>")]

    @property
    def optional_columns(self) -> list[str]:
        """Columns a producer may leave out (null): those only some runs fill (generate runs' step,
        segment, prompt_text, ...) and the value columns a site does not define."""
        return [c["name"] for c in self.columns if c.get("optional") or c["type"] in ("value", "list<value>")]

    def arrow(self, weight_dtype: str = "float16") -> pa.Schema:
        return pa.schema([pa.field(c["name"], _arrow_type(c["type"], weight_dtype)) for c in self.columns])


@lru_cache(maxsize=None)
def load_schemas() -> dict[str, TableSchema]:
    schemas = {}
    for path in sorted(_schema_dir().glob("*.json")):
        d = json.loads(path.read_text())
        schemas[d["table"]] = TableSchema(d["table"], d["version"], d["description"], tuple(d["columns"]),
                                          d["layer_folders"], tuple(d["sort_by"]), tuple(d["row_group_by"]))
    return schemas


def table_schema(name: str) -> TableSchema:
    schemas = load_schemas()
    if name not in schemas:
        raise AttnpipeError(f"unknown table {name!r}; tables: {', '.join(schemas)}")
    return schemas[name]
