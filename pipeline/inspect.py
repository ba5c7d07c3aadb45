"""Summaries of an output directory, read from its commit records: tables, row counts, layers,
heads, provenance. Files are listed from the records, never by globbing the folders."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads

from .errors import OutputError
from .store import paths
from .store.commit import read_records
from .store.dataset import check_format, damaged_files, planned_shards, read_info, version_location, versions
from .store.location import Location, as_location
from .store.schema import load_schemas
from .store.verify import parquet_format


def open_table(out: Location | Path | str, table: str, records: dict | None = None) -> pads.Dataset:
    """The committed files of one table as a pyarrow dataset (`layer` is a column)."""
    loc = as_location(out)
    records = read_records(loc) if records is None else records
    rels = [f["path"] for _, r in sorted(records.items()) for f in r["files"] if f["table"] == table]
    if not rels:
        raise OutputError(f"{loc} has no committed rows of table {table!r}")
    return pads.dataset([loc.path(r) for r in rels], format=parquet_format(), filesystem=loc.arrow_filesystem())


def summarize(out: Location | Path | str) -> dict:
    out = as_location(out)
    if not out.isdir():
        raise OutputError(f"{out} is not a folder")
    check_format(out)
    info, records = read_info(out), read_records(out)
    if info is None and not records:
        raise OutputError(f"{out} is not an attnpipe output directory (no {paths.DATASET} and no commit records)")
    recipes = (info or {}).get("job", {}).get("recipes", [])
    tables, missing = {}, []
    for name, schema in load_schemas().items():
        files = [f for r in records.values() for f in r["files"] if f["table"] == name]
        if not files:
            continue
        # Missing, truncated or changed (sha256): never summarised as complete.
        gone = damaged_files(out, {"files": files})
        missing += gone
        t = {"rows": sum(f["rows"] for f in files), "files": len(files), "schema_version": schema.version}
        layers = sorted({f["layer"] for f in files if f["layer"] is not None})
        if layers:
            t["layers"] = layers
        names = sorted({recipes[f["recipe"]]["name"] for f in files
                        if f["recipe"] is not None and f["recipe"] < len(recipes)})
        if names:
            t["recipes"] = names
        if "head" in schema.column_names and not gone:
            heads = pads.dataset([out.path(f["path"]) for f in files], format=parquet_format(),
                                 filesystem=out.arrow_filesystem()).to_table(columns=["head"])
            t["heads"] = sorted(heads.column("head").unique().to_pylist())
        tables[name] = t
    num_shards = planned_shards(info) or "?"
    latest = max(records.values(), key=lambda r: r.get("committed_at", ""), default={})
    status = "complete" if isinstance(num_shards, int) and len(records) >= num_shards else "partial"
    root_versions = versions(out)
    return {"output": str(out), "status": "damaged" if missing else status,
            "job": (info or {}).get("job", {}).get("name"), "shards": f"{len(records)}/{num_shards} committed",
            "missing_files": missing, "tables": tables, "provenance": latest.get("provenance", {}),
            "versions": [str(version_location(out, v)) for v in root_versions if v > 1]}


def _compact(values: list) -> str:
    if len(values) > 3 and all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(str(v) for v in values)


def format_summary(s: dict) -> str:
    lines = [f"{s['output']}: job {s['job']!r}, {s['status']}, shards {s['shards']}"]
    if s["missing_files"]:
        lines.append(f"  {len(s['missing_files'])} committed files are missing or damaged (first: {s['missing_files'][0]}); "
                     "run 'attnpipe verify' for details, and rerun the job to rewrite those shards")
    lines.append("tables:")
    for name, t in s["tables"].items():
        extra = "".join(f", {k} {_compact(t[k])}" for k in ("layers", "heads", "recipes") if k in t)
        lines.append(f"  {name:<11} {t['rows']:>10,} rows in {t['files']} files (schema v{t['schema_version']}){extra}")
    p = s["provenance"]
    if p:
        lines.append("provenance:")
        for key in ("model", "source", "revision", "weights_sha256", "tokenizer", "dtype", "weight_dtype",
                    "attention_backend", "causal", "num_layers", "num_heads", "window_length", "stride"):
            if key in p:
                lines.append(f"  {key:<18} {p[key]}")
        lines.append("  recipes            " + ", ".join(f"{k} v{v}" for k, v in p.get("recipes", {}).items()))
        lines.append("  versions           " + ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items()))
    if s["versions"]:
        lines.append("later versions: " + ", ".join(s["versions"]))
    return "\n".join(lines)
