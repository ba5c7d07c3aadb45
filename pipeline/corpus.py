"""Read a text corpus with Hugging Face datasets and split it into deterministic shards.

Local text, JSON/JSONL, CSV/TSV and Parquet files (or a folder or glob of them), folders written
by `Dataset.save_to_disk`, and hub dataset names for users who are online.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorpusError
from .job import CorpusSpec

SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                 ".ndjson": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def check_utf8(path: Path) -> None:
    """Fail with the line number of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                line += chunk[: exc.start].count(b"\n")
                raise CorpusError(f"corpus file {path} is not valid UTF-8: byte {bad} "
                                  f"(line {line}) cannot be decoded; re-encode the file as UTF-8") from None
            line += chunk.count(b"\n")
            offset += len(chunk)


def _format_of(files: list[Path], declared: str) -> str:
    if declared != "auto":
        return declared
    kinds = {SUFFIX_FORMAT.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise CorpusError(f"cannot tell the corpus format of {[str(f) for f in files][:3]}; set "
                          f"corpus.format to one of text, json, csv, parquet, disk, hub")
    return kinds.pop()


def _has_rows(files: list[Path], fmt: str) -> bool:
    """Cheap emptiness check, so an empty corpus gets a clear error instead of a loader crash."""
    if fmt == "parquet":
        return any(pq.read_metadata(f).num_rows for f in files)
    header = 1 if fmt == "csv" else 0  # a CSV with only its header line has no rows
    for f in files:
        with f.open("rb") as fh:
            lines = (line for line in fh if line.strip())
            if next(itertools.islice(lines, header, None), None) is not None:  # reads a few lines only
                return True
    return False


def _load_files(files: list[Path], fmt: str) -> datasets.Dataset:
    if fmt in ("text", "json", "csv"):
        for f in files:
            check_utf8(f)
    if not _has_rows(files, fmt):
        raise CorpusError(f"corpus {files[0] if len(files) == 1 else files[0].parent} has no rows")
    try:
        kwargs = {"delimiter": "\t"} if fmt == "csv" and files[0].suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as exc:
        cause = exc.__cause__ or exc
        raise CorpusError(f"could not read corpus {files[0]} as {fmt}: {cause}") from None


def _load_disk(path: Path, split: str) -> datasets.Dataset:
    state = path / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
        raise CorpusError(f"corpus {path} has no rows")  # load_from_disk crashes on 0 shards
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, IndexError, pa.ArrowException) as exc:
        raise CorpusError(f"could not read saved dataset {path}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"corpus {path} has no split {split!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _load_hub(name: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for a missing/offline name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"corpus {name!r} was not found locally, and loading it from the "
                          f"Hugging Face Hub failed: {first}") from None


def open_corpus(spec: CorpusSpec, base_dir: Path) -> datasets.Dataset:
    """The whole corpus as one Dataset, columns checked, `limit` applied."""
    if spec.format == "hub":
        ds = _load_hub(spec.path, spec.split)
    else:
        path = Path(spec.path).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if any(ch in spec.path for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(path)))
            if not files:
                raise CorpusError(f"corpus pattern {path} matches no file")
            ds = _load_files(files, _format_of(files, spec.format))
        elif path.is_dir():
            if spec.format == "disk" or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                ds = _load_disk(path, spec.split)
            else:
                files = sorted(f for f in path.iterdir() if f.suffix.lower() in SUFFIX_FORMAT)
                if not files:
                    raise CorpusError(f"corpus folder {path} holds no .txt, .json(l), .csv or .parquet file")
                ds = _load_files(files, _format_of(files, spec.format))
        elif path.is_file():
            ds = _load_files([path], _format_of([path], spec.format))
        elif spec.format == "auto" and spec.path.count("/") <= 1 and not spec.path.startswith((".", "/", "~")):
            ds = _load_hub(spec.path, spec.split)
        else:
            raise CorpusError(f"corpus file not found: {path}")
    _check_columns(ds, spec)
    if len(ds) == 0:
        raise CorpusError(f"corpus {spec.path} has no rows")
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return ds


def _check_columns(ds: datasets.Dataset, spec: CorpusSpec) -> None:
    cols = ds.column_names
    wanted = [("corpus.text_column", spec.text_column)]
    wanted += [("corpus.id_column", spec.id_column)] if spec.id_column else []
    wanted += [("corpus.metadata_columns", c) for c in spec.metadata_columns]
    for key, col in wanted:
        if col not in cols:
            raise CorpusError(f"{key}: column {col!r} is not in corpus {spec.path}; "
                              f"columns: {', '.join(cols)}")


def shard_of(ds: datasets.Dataset, num_shards: int, index: int) -> datasets.Dataset:
    """Shard `index` of `num_shards`: contiguous, so the same job always yields the same shards.
    With more shards than rows, the shards past the last row are empty."""
    if index >= len(ds):  # datasets' contiguous shard raises here instead of returning nothing
        return ds.select([])
    return ds.shard(num_shards=num_shards, index=index, contiguous=True)


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class Documents:
    """The documents of one shard, in corpus order."""

    doc_ids: list[str]
    texts: list[str]
    metadata: dict[str, list]


def documents_of(ds: datasets.Dataset, spec: CorpusSpec) -> Documents:
    texts = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in ds[spec.text_column]]
    if spec.id_column:
        ids = [str(i) for i in ds[spec.id_column]]
    else:
        ids = [text_sha1(t)[:16] for t in texts]
    meta = {c: ds[c] for c in spec.metadata_columns}
    return Documents(ids, texts, meta)
