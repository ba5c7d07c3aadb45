"""Read a text corpus with Hugging Face datasets and split it into deterministic shards.

Local text, JSON/JSONL, CSV/TSV and Parquet files (or a folder or glob of them), folders written
by `Dataset.save_to_disk`, and hub dataset names for users who are online.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import hub
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _parquet_rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"corpus file {path} is not a Parquet file, or it is damaged: {_first_line(exc)}") from None


def _check_csv_header(path: Path, delimiter: str) -> None:
    """pandas reads a first row with more fields than the header as an index plus shifted
    columns (the text column silently holds another field); refuse that instead."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = (row for row in csv.reader(fh, delimiter=delimiter) if row)
            header, first = next(rows, None), next(rows, None)
    except csv.Error:
        return  # e.g. a field over csv's size limit; the loader itself reports real syntax errors
    if header and first and len(first) > len(header):
        raise CorpusError(f"corpus file {path}: the first row has {len(first)} fields but the header has "
                          f"{len(header)} ({', '.join(header)}); quote fields that contain {delimiter!r}")


def _has_rows(files: list[Path], fmt: str) -> bool:
    """Cheap emptiness check, so an empty corpus gets a clear error instead of a loader crash."""
    if fmt == "parquet":
        return sum(_parquet_rows(f) for f in files) > 0  # every footer: names a bad file up front
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
    kwargs = {"delimiter": "\t"} if fmt == "csv" and files[0].suffix.lower() == ".tsv" else {}
    if fmt == "csv":
        for f in files:
            _check_csv_header(f, kwargs.get("delimiter", ","))
    try:
        return _load_dataset(files, fmt, kwargs)
    except CorpusError as exc:
        if len(files) == 1:
            raise
        for f in files:  # only on failure: find the file to name (datasets' error does not)
            _load_dataset([f], fmt, kwargs)
        raise CorpusError(f"could not read corpus {files[0].parent} ({len(files)} {fmt} files) "
                          f"as one dataset: {str(exc).split(': ', 1)[-1]}") from None


def _load_dataset(files: list[Path], fmt: str, kwargs: dict) -> datasets.Dataset:
    try:
        return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as exc:
        raise CorpusError(f"could not read corpus {files[0]} as {fmt}: {_first_line(exc.__cause__ or exc)}") from None


def _load_disk(path: Path, split: str) -> datasets.Dataset:
    state = path / "state.json"
    try:
        if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files"):
            raise CorpusError(f"corpus {path} has no rows")  # load_from_disk crashes on 0 shards
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError, pa.ArrowException) as exc:
        raise CorpusError(f"could not read saved dataset {path} (damaged or not written by "
                          f"save_to_disk): {_first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"corpus {path} has no split {split!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _load_hub(name: str, split: str, tried: Path | None = None) -> datasets.Dataset:
    """`tried`: the local path that did not exist, shown in the error (a typo'd local path?)."""
    try:
        with hub.honour_offline():
            return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for a missing/offline name
        where = f" was not found locally (tried {tried}), and" if tried else ":"
        offline = " (HF_HUB_OFFLINE is set)" if hub.offline() else ""
        raise CorpusError(f"corpus {name!r}{where} loading it from the Hugging Face Hub{offline} failed: "
                          f"{_first_line(exc)}") from None


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
        elif spec.format == "auto" and not hub.is_local_only(spec.path, base_dir):
            ds = _load_hub(spec.path, spec.split, tried=hub.local_path(spec.path, base_dir))
        else:
            raise CorpusError(f"corpus file not found: {hub.local_path(spec.path, base_dir)}")
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


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _as_text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


@dataclass
class ShardDocs:
    """The documents of one shard, sorted by doc_id (so the rows written for a doc_id range are
    contiguous and row-group statistics on doc_id prune well)."""

    shard: int
    rows: np.ndarray  # (docs,) corpus rows
    doc_ids: list[str]
    text_sha1: list[str]
    occurrence: np.ndarray  # (docs,) 1 = first document with this text
    chars: np.ndarray  # (docs,) characters of each text

    @property
    def fingerprint(self) -> str:
        """What this shard's output depends on in the corpus: its documents and their texts."""
        digest = hashlib.sha256()
        for doc_id, sha in zip(self.doc_ids, self.text_sha1):
            digest.update(f"{doc_id}\t{sha}\n".encode())
        return digest.hexdigest()[:32]


class Corpus:
    """An opened corpus with one unique doc_id per row.

    With `id_column`, its values (every one present and distinct). Without, the first 16 hex
    digits of sha1(text), and `-2`, `-3`, ... for later repeats of the same text: a stable
    function of the rows up to and including this one, so appending rows never changes an id.
    """

    def __init__(self, ds: datasets.Dataset, spec: CorpusSpec):
        self.spec = spec
        self.table: pa.Table = ds.data.table if ds._indices is None else ds.flatten_indices().data.table
        texts = self.table.column(spec.text_column)
        self.text_sha1: list[str] = []
        self.chars = np.zeros(len(self.table), dtype=np.int64)
        row = 0
        for chunk in texts.chunks:
            for value in chunk.to_pylist():
                text = _as_text(value)
                self.text_sha1.append(text_sha1(text))
                self.chars[row] = len(text)
                row += 1
        self.occurrence = np.ones(len(self.table), dtype=np.int32)
        seen: dict[str, int] = {}
        for i, sha in enumerate(self.text_sha1):
            seen[sha] = seen.get(sha, 0) + 1
            self.occurrence[i] = seen[sha]
        self.doc_ids = self._ids_from_column() if spec.id_column else [
            sha[:16] if n == 1 else f"{sha[:16]}-{n}" for sha, n in zip(self.text_sha1, self.occurrence)]

    def __len__(self) -> int:
        return len(self.table)

    @property
    def repeated_texts(self) -> int:
        """Documents whose text already appeared in an earlier row."""
        return int((self.occurrence > 1).sum())

    def _ids_from_column(self) -> list[str]:
        col = self.spec.id_column
        values = self.table.column(col).to_pylist()
        where: dict[str, int] = {}
        for row, value in enumerate(values):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise CorpusError(f"corpus.id_column {col!r}: row {row} has no id (null or empty); "
                                  "every document needs a distinct id, or drop id_column to use text hashes")
            key = str(value)
            if key in where:
                rows = [i for i, v in enumerate(values) if str(v) == key]
                more = f" and {len(rows) - 2} more" if len(rows) > 2 else ""
                raise CorpusError(f"corpus.id_column {col!r}: value {key!r} appears in rows {rows[0]} and "
                                  f"{rows[1]}{more}; ids must be distinct, or drop id_column to use text hashes")
            where[key] = row
        return list(where)

    def shard(self, index: int, start: int, stop: int) -> ShardDocs:
        """Shard `index`: corpus rows [start, stop), sorted by doc_id."""
        rows = np.arange(start, min(stop, len(self)))
        rows = rows[np.argsort(np.array(self.doc_ids[start:stop], dtype=object), kind="stable")]
        return ShardDocs(index, rows, [self.doc_ids[r] for r in rows], [self.text_sha1[r] for r in rows],
                         self.occurrence[rows], self.chars[rows])

    def texts(self, rows: np.ndarray) -> list[str]:
        return [_as_text(v) for v in self.table.column(self.spec.text_column).take(pa.array(rows)).to_pylist()]

    def metadata(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """Metadata columns of `rows`, with their corpus Arrow types."""
        return {c: self.table.column(c).take(pa.array(rows)) for c in self.spec.metadata_columns}

    def metadata_schema(self) -> pa.Schema:
        return pa.schema([self.table.schema.field(c) for c in self.spec.metadata_columns])
