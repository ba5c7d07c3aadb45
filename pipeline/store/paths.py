"""The one place that builds every key of an output directory: file and folder names.

    OUT/_dataset.json                  what this dataset is: job, fingerprint (written at first commit)
    OUT/_commits/shard-00000.json      a shard's completion record: the shard exists iff this exists
    OUT/_manifest.json                 a summary derived from the records (never read back as truth)
    OUT/_failures/shard-00003.json     a shard that failed all its retries: the error (until it commits)
    OUT/_lock                          held by the run writing to OUT (host, pid, start time)
    OUT/_staging/shard-00000-<attempt>/...   files of an attempt in progress
    OUT/documents/shard-00000-<attempt>-0.parquet
    OUT/edges/layer-003/shard-00000-<attempt>-r1-0.parquet   (r1: the job's recipe 1)
    OUT/edges/decoder-cross/layer-003/...   encoder-decoder runs: a folder per site (stack-attention)
    OUT/v2/...                         a later run of a changed job (`attnpipe run --new-run`)
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

DATASET = "_dataset.json"
MANIFEST = "_manifest.json"
COMMITS = "_commits"
FAILURES = "_failures"
STAGING = "_staging"
LOCK = "_lock"
FORMAT_VERSION = 2  # the layout above; version 1 (attnpipe 0.1) had no commit records

# shard-00000-1a2b3c4d[-r2]-0.parquet: shard, attempt, recipe index, part
DATA_FILE = re.compile(r"^shard-(\d{5})-([0-9a-f]{8})(?:-r(\d+))?-(\d+)\.parquet$")
VERSION_DIR = re.compile(r"^v(\d+)$")


def new_attempt() -> str:
    return secrets.token_hex(4)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def layer_folder(layer: int) -> str:
    return f"layer-{layer:03d}"


def site_folder(stack: str, attention: str) -> str:
    """The folder of one attention site (encoder-self, decoder-self, decoder-cross) in the runs
    of encoder-decoder models, whose three sites share layer numbers."""
    return f"{stack}-{attention}"


def data_file(table: str, shard: int, attempt: str, layer: int | None, recipe: int | None,
              part: int, site: str | None = None) -> Path:
    """Path of one data file, relative to the output directory; `site` (a `site_folder`) only
    where one run writes several sites' layers."""
    folder = Path(table) if site is None else Path(table) / site
    folder = folder if layer is None else folder / layer_folder(layer)
    tag = "" if recipe is None else f"-r{recipe}"
    return folder / f"{shard_name(shard)}-{attempt}{tag}-{part}.parquet"


def staging_dir(root: Path, shard: int, attempt: str) -> Path:
    """Staging of one attempt under `root` (the output folder itself when it is local)."""
    return Path(root) / STAGING / f"{shard_name(shard)}-{attempt}"


def record_rel(shard: int) -> str:
    return f"{COMMITS}/{shard_name(shard)}.json"


def failure_rel(shard: int) -> str:
    return f"{FAILURES}/{shard_name(shard)}.json"


def record_path(out: Path, shard: int) -> Path:
    """A local output's record file of `shard`."""
    return Path(out) / record_rel(shard)


def failure_path(out: Path, shard: int) -> Path:
    return Path(out) / failure_rel(shard)


def version_dir(out: Path, version: int) -> Path:
    """Version 1 is the output folder itself; later runs of a changed job go to OUT/v2, v3, ..."""
    return Path(out) if version == 1 else Path(out) / f"v{version}"


def recipe_label(name: str, params: dict) -> str:
    """A short, stable label for a recipe and its parameters, usable unquoted in SQL: the name,
    then each parameter as key and value in key order (a decimal point becomes `p`, `max_tokens`
    is `max`), `_mean` for a recipe on the head mean and `_word` for one on words: topk_k8_mean,
    threshold_t0p05, topp_p0p9_mean, rollout_k8, dense_max64, head_stats, topk_k8_mean_word,
    head_stats_word. One label per recipe id."""
    parts = [name]
    for key, value in sorted(params.items()):
        if key in ("per_head", "level"):
            continue
        short = "max" if key == "max_tokens" else key
        text = format(value, "g") if isinstance(value, float) else str(value)
        parts.append(short + text.replace(".", "p").replace("-", "m").replace("+", ""))
    if params.get("per_head") is False:
        parts.append("mean")
    if params.get("level", "token") != "token":
        parts.append(params["level"])
    return "_".join(parts)

