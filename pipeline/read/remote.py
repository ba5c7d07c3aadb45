"""Datasets at fsspec URLs (s3://, gs://, memory://, ...) on the read side: the committed files are
mirrored into a local cache folder, checked against their records' sha256 on the way, and read
from there by the same code as a local folder (DuckDB's read-only views included).

Only what the commit records list is copied; a file already in the cache with the recorded size is
kept, so reopening a dataset after new commits fetches only the new shards. The cache lives in
$ATTNPIPE_CACHE (default ~/.cache/attnpipe), one folder per URL, and can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import ReadError
from ..store import paths
from ..store.commit import read_records
from ..store.location import Location


def is_url(path: str | Path) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe") / "remote"


def mirror(url: str) -> Path:
    """A local folder holding the committed data of the dataset at `url` (a snapshot as of now)."""
    try:
        loc = Location(url)
    except Exception as exc:  # noqa: BLE001 - OutputError or an fsspec import failure: say it as a read error
        raise ReadError(str(exc)) from None
    if not loc.isdir():
        raise ReadError(f"{url} is not a folder (nothing there, or not reachable); give the output URL of an "
                        "attnpipe run" + (": memory:// data lives only in the process that wrote it"
                                          if loc.protocol == "memory" else ""))
    records = read_records(loc)
    if not records:
        raise ReadError(f"{url} has no commit records; run a job into it first")
    folder = cache_root() / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]
    wanted = {f["path"]: f for r in records.values() for f in r["files"]}
    for rel, entry in sorted(wanted.items()):
        _fetch(loc, rel, folder, entry)
    _replace_tree(folder / paths.COMMITS, {n: loc.read_bytes(f"{paths.COMMITS}/{n}") for n in loc.listdir(paths.COMMITS)
                                           if n.endswith(".json") and not n.startswith(".")})
    if loc.isfile(paths.DATASET):
        _write(folder / paths.DATASET, loc.read_bytes(paths.DATASET))
    (folder / "_source.json").write_text(json.dumps({"url": url}))
    _drop_unlisted(folder, set(wanted))
    return folder


def _fetch(loc: Location, rel: str, folder: Path, entry: dict) -> None:
    target = folder / rel
    if target.is_file() and target.stat().st_size == entry["bytes"]:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    with loc.open(rel) as src, open(tmp, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 22), b""):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != entry.get("sha256"):
        tmp.unlink()
        raise ReadError(f"{loc.url(rel)} differs from its commit record (sha256); the data is damaged: "
                        f"`attnpipe verify {loc.url()}` tells more")
    os.replace(tmp, target)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _replace_tree(folder: Path, files: dict[str, bytes]) -> None:
    """The records as they are now: a record removed remotely (a shard redone) goes here too."""
    shutil.rmtree(folder, ignore_errors=True)
    for name, data in files.items():
        _write(folder / name, data)


def _drop_unlisted(folder: Path, wanted: set[str]) -> None:
    """Data files of shards that were redone remotely since the last mirror."""
    for table_dir in folder.iterdir():
        if table_dir.is_dir() and not table_dir.name.startswith("_"):
            for path in table_dir.rglob("*.parquet"):
                if path.relative_to(folder).as_posix() not in wanted:
                    path.unlink()
