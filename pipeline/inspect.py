"""Summaries of an output directory: tables, row counts, layers and heads, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads

from .errors import OutputError
from .paths import manifest_path
from .schema import load_schemas


def open_table(out: Path, table: str) -> pads.Dataset:
    """A table of an output directory as a pyarrow dataset (hive-partitioned by layer)."""
    folder = Path(out) / table
    if not folder.is_dir():
        raise OutputError(f"{out} has no table {table!r}")
    return pads.dataset(folder, format="parquet", partitioning="hive")


def summarize(out: Path) -> dict:
    out = Path(out)
    path = manifest_path(out)
    if not path.is_file():
        raise OutputError(f"{out} is not an attnpipe output directory (no {path.name})")
    manifest = json.loads(path.read_text())
    tables = {}
    for name, schema in load_schemas().items():
        if not (out / name).is_dir():
            continue
        ds = open_table(out, name)
        info = {"rows": ds.count_rows(), "files": len(ds.files), "schema_version": schema.version}
        cols = ds.schema.names
        if "layer" in cols:
            info["layers"] = sorted(set(ds.to_table(columns=["layer"]).column("layer").unique().to_pylist()))
        if "head" in cols:
            info["heads"] = sorted(set(ds.to_table(columns=["head"]).column("head").unique().to_pylist()))
        if "recipe" in cols:
            info["recipes"] = sorted(set(ds.to_table(columns=["recipe"]).column("recipe").unique().to_pylist()))
        tables[name] = info
    shards = manifest.get("shards", {})
    return {"output": str(out), "status": manifest.get("status"), "job": manifest["job"].get("name"),
            "shards": f"{len(shards)}/{manifest.get('num_shards', '?')} complete",
            "tables": tables, "provenance": manifest.get("provenance", {})}


def _compact(values: list) -> str:
    if len(values) > 3 and all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(str(v) for v in values)


def format_summary(s: dict) -> str:
    lines = [f"{s['output']}: job {s['job']!r}, {s['status']}, shards {s['shards']}", "tables:"]
    for name, t in s["tables"].items():
        extra = "".join(f", {k} {_compact(t[k])}" for k in ("layers", "heads", "recipes") if k in t)
        lines.append(f"  {name:<11} {t['rows']:>10,} rows in {t['files']} files (schema v{t['schema_version']}){extra}")
    p = s["provenance"]
    if p:
        lines.append("provenance:")
        for key in ("model", "source", "revision", "weights_sha256", "tokenizer", "dtype",
                    "attention_backend", "causal", "num_layers", "num_heads", "window_length", "stride"):
            if key in p:
                lines.append(f"  {key:<18} {p[key]}")
        lines.append("  recipes            " + ", ".join(f"{k} v{v}" for k, v in p.get("recipes", {}).items()))
        lines.append("  versions           " + ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()))
    return "\n".join(lines)
