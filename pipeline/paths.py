"""The one place that builds every output key: table folders, partition names, file names.

Layout of an output directory:

    OUT/_manifest.json
    OUT/documents/shard-00000.parquet
    OUT/tokens/shard-00000.parquet
    OUT/head_stats/layer=0/shard-00000.parquet      (tables with a layer are hive-partitioned)
    OUT/_staging/shard-00000/...                      (in-progress shard, never read by queries)
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "_manifest.json"
STAGING = "_staging"
LAYER_KEY = "layer"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def table_file(table: str, shard: int, layer: int | None = None) -> Path:
    """Path of one shard's file of `table`, relative to the output directory."""
    part = Path(table) if layer is None else Path(table) / f"{LAYER_KEY}={layer}"
    return part / f"{shard_name(shard)}.parquet"


def staging_dir(out: Path, shard: int) -> Path:
    return out / STAGING / shard_name(shard)


def manifest_path(out: Path) -> Path:
    return out / MANIFEST
