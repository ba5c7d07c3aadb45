"""Open a corpus as one Arrow-backed `datasets.Dataset` and split it into deterministic shards.

Local text, JSON/JSONL and CSV/TSV files are read exactly by `corpus_files` (text as one document
per file, paragraph or line: `corpus.text_unit`), a batch at a time, into an Arrow file in the
corpus cache that is memory-mapped (`corpus_cache`: later opens and other workers map it without
reading the files again); Parquet files, folders written by
`Dataset.save_to_disk` and hub datasets (for users who are online) through `datasets`. Files come
as one file, a folder (its files, not its subfolders) or a glob (`**` matches any depth). Every
document of a local file keeps its file name and line, paragraph or row number.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import corpus_cache
from . import corpus_files as files_
from . import corpus_find as find
from . import hub
from .corpus_files import SOURCE_COLUMNS, SOURCE_FILE, SOURCE_INDEX
from .errors import CorpusError
from .job import CorpusSpec

SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                 ".ndjson": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


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


# --- reading them -----------------------------------------------------------------------------

def _parquet_rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"corpus file {path} is not a Parquet file, or it is damaged: {_first_line(exc)}") from None


def _wanted(spec: CorpusSpec) -> list[str]:
    cols = [spec.text_column] + [c for c in (spec.target_column, spec.context_column) if c]
    cols += ([spec.id_column] if spec.id_column else []) + list(spec.metadata_columns)
    return list(dict.fromkeys(cols))


def _load_files(files: list[Path], root: Path, spec: CorpusSpec, unit: str) -> tuple[datasets.Dataset, list[str]]:
    """The files as one Dataset with source columns, and the column names the files hold."""
    fmt = _format_of(files, spec.format)
    if spec.text_unit is not None and fmt != "text":
        raise CorpusError(f"corpus.text_unit applies to text files only; {files[0]} is read as {fmt} (one "
                          "document per record): remove text_unit")
    names = [f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name for f in files]
    if fmt == "parquet":
        rows = [_parquet_rows(f) for f in files]  # every footer: names a bad file up front
        if not sum(rows):
            raise CorpusError(f"corpus {_where(files, root)} has no rows")
        ds = _load_dataset(files, fmt)
        table = files_.with_row_numbers(ds.data.table, names, rows)
        return datasets.Dataset(datasets.table.InMemoryTable(table)), ds.column_names
    options = {"format": fmt, "unit": unit, "wanted": _wanted(spec), "text_column": spec.text_column,
               "id_column": spec.id_column, "names": names}  # what the table depends on, beside the files
    opened = corpus_cache.open_cached(files, options, lambda sink: files_.write_files(
        sink, files, names, fmt, unit, _wanted(spec), spec.text_column, spec.id_column))
    # A shared cache file is named so that pickling the Dataset sends its path, not its data; the
    # fingerprint is given, since datasets would otherwise hash the whole table.
    table = opened.table
    data = datasets.table.MemoryMappedTable(table, str(opened.path)) if opened.path else \
        datasets.table.InMemoryTable(table)
    return datasets.Dataset(data, fingerprint=opened.key), opened.columns


def _where(files: list[Path], root: Path) -> Path:
    return files[0] if len(files) == 1 else root


def _load_dataset(files: list[Path], fmt: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as exc:
        if len(files) > 1:  # only on failure: find the file to name (datasets' error does not)
            for f in files:
                _load_dataset([f], fmt)
        raise CorpusError(f"could not read corpus {files[0] if len(files) == 1 else files[0].parent} as {fmt}: "
                          f"{_first_line(exc.__cause__ or exc)}") from None


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


def _open_local(spec: CorpusSpec, path: Path) -> tuple[datasets.Dataset, list[str]] | None:
    """A local corpus, or None when `path` does not exist (maybe a hub name)."""
    if any(ch in spec.path for ch in find.WILDCARDS):
        files, root = find.pattern_files(path, f"pattern {path}")
        if not files:
            raise CorpusError(f"corpus pattern {path} matches no file")
        return _load_files(files, root, spec, spec.text_unit or "file")
    if path.is_symlink() and not path.exists():  # a broken link: local, never sent to the Hub
        raise CorpusError(f"corpus path {path} {find.broken_link(path)}; point corpus.path at the corpus itself")
    if path.is_dir():
        if spec.format == "disk" or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = _load_disk(path, spec.split)
            return ds, ds.column_names
        files = find.folder_files(path, SUFFIX_FORMAT)
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt, .json(l), .csv or .parquet file "
                              "(subfolders are not read: use a glob such as docs/**/*.txt)")
        return _load_files(files, path, spec, spec.text_unit or "file")
    if path.is_file():
        return _load_files([path], path.parent, spec, spec.text_unit or "line")
    return None


def open_corpus(spec: CorpusSpec, base_dir: Path) -> datasets.Dataset:
    """The whole corpus as one Dataset, columns and types checked, `limit` applied. Rows of local
    files carry their source (SOURCE_FILE, SOURCE_INDEX columns)."""
    if spec.format == "hub":
        ds = _load_hub(spec.path, spec.split)
        columns = ds.column_names
    else:
        path = Path(spec.path).expanduser()
        path = path if path.is_absolute() else base_dir / path
        opened = _open_local(spec, path)
        if opened is None and spec.format == "auto" and not hub.is_local_only(spec.path, base_dir):
            ds = _load_hub(spec.path, spec.split, tried=hub.local_path(spec.path, base_dir))
            columns = ds.column_names
        elif opened is None:
            raise CorpusError(f"corpus file not found: {hub.local_path(spec.path, base_dir)}")
        else:
            ds, columns = opened
    if len(ds) == 0:
        _no_text(spec, 0)
    _check_columns(columns, spec)
    _check_types(ds, spec)
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    _check_has_text(ds, spec)
    return ds


def _check_columns(columns: list[str], spec: CorpusSpec) -> None:
    cols = [c for c in columns if c not in SOURCE_COLUMNS]
    wanted = [("corpus.text_column", spec.text_column)]
    wanted += [("corpus.target_column", spec.target_column)] if spec.target_column else []
    wanted += [("corpus.context_column", spec.context_column)] if spec.context_column else []
    wanted += [("corpus.id_column", spec.id_column)] if spec.id_column else []
    wanted += [("corpus.metadata_columns", c) for c in spec.metadata_columns]
    for key, col in wanted:
        if col not in cols:
            raise CorpusError(f"{key}: column {col!r} is not in corpus {spec.path}; "
                              f"columns: {', '.join(cols)}")


def _row_name(ds: datasets.Dataset, row: int) -> str:
    """'row 7' or 'row 7 (docs/a.jsonl, record 3)'."""
    if SOURCE_FILE not in ds.column_names:
        return f"row {row}"
    source = ds.data.table.slice(row, 1)
    name, index = source.column(SOURCE_FILE)[0].as_py(), source.column(SOURCE_INDEX)[0].as_py()
    return f"row {row} ({name}" + (f", record {index})" if index is not None else ")")


def _check_types(ds: datasets.Dataset, spec: CorpusSpec) -> None:
    """Texts are strings, ids scalars: a number, list or mapping is refused, never stringified
    (JSON and CSV files are checked value by value as they are read; this covers Parquet,
    save_to_disk and hub datasets, whose columns are typed)."""
    is_text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    checks = [("corpus.text_column", spec.text_column, is_text, "strings")]
    if spec.target_column:
        checks.append(("corpus.target_column", spec.target_column, is_text, "strings"))
    if spec.context_column:
        checks.append(("corpus.context_column", spec.context_column, is_text, "strings"))
    if spec.id_column:
        checks.append(("corpus.id_column", spec.id_column,
                       lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                       or pa.types.is_floating(t) or pa.types.is_boolean(t), "strings or numbers"))
    table = ds.data.table
    for key, col, ok, valid in checks:
        kind = table.schema.field(col).type
        mixed = type(ds.features.get(col)).__name__ == "Json"  # datasets keeps mixed values as JSON strings
        if pa.types.is_null(kind) or (ok(kind) and not mixed):
            continue
        if mixed:  # the first value that is not a string (decoded from datasets' JSON storage)
            row = next((i for i, v in enumerate(ds[col]) if v is not None and not isinstance(v, str)), 0)
            what = f"values of mixed types ({type(ds[row][col]).__name__} among strings)"
        else:
            valid_rows = pc.indices_nonzero(pc.is_valid(table.column(col)))
            row = int(valid_rows[0].as_py()) if len(valid_rows) else 0
            what = f"{kind} values"
        raise CorpusError(f"{key} {col!r} holds {what}, e.g. {_row_name(ds, row)}; it must hold {valid}")


def _check_has_text(ds: datasets.Dataset, spec: CorpusSpec) -> None:
    """No rows, or only empty or whitespace documents: refused with one message in every format
    (a run would write nothing but empty rows)."""
    texts = ds.data.table.column(spec.text_column)
    if ds._indices is not None:  # corpus.limit
        texts = texts.take(ds._indices.column(0))
    # Batch by batch, stopping at the first text: a memory-mapped corpus is not read whole.
    if pa.types.is_null(texts.type) or not any(
            pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0), skip_nulls=True).as_py()
            for chunk in texts.chunks):
        _no_text(spec, len(ds))


def _no_text(spec: CorpusSpec, rows: int) -> None:
    limit = " (corpus.limit)" if spec.limit is not None and spec.limit <= rows else ""
    raise CorpusError(f"corpus {spec.path} has no text: no rows, or only empty or whitespace documents "
                      f"({rows} rows{limit}; blank lines are not documents); nothing to run")


def text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _as_text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _occurrence(digests: np.ndarray) -> np.ndarray:
    """(rows,) which repeat of its text each row is, 1 for the first, counted in row order: rows
    grouped by a stable sort on the digest's first 8 bytes, each group checked to hold one full
    digest (else, a 64-bit collision, sorted on all 20 bytes)."""
    n = len(digests)
    keys = np.ascontiguousarray(digests[:, :8]).view("<u8").ravel()
    order = np.argsort(keys, kind="stable")  # rows of one text together, in row order
    ranked, grouped = keys[order], digests[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if n else np.zeros(0, np.int64)
    same = np.ones(n, bool)
    same[starts] = False  # rows that should repeat the row before them in `order`
    if (grouped[same] != grouped[np.flatnonzero(same) - 1]).any():
        full = np.ascontiguousarray(digests).view([("a", "<u8"), ("b", "<u8"), ("c", "<u4")]).ravel()
        order = np.argsort(full, kind="stable")
        starts = np.flatnonzero(np.r_[True, full[order][1:] != full[order][:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))  # where each row's group starts
    occurrence = np.empty(n, np.int32)
    occurrence[order] = np.arange(n) - first + 1
    return occurrence


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
    # of each target text in encoder-decoder pair runs, of each context in generate runs
    target_sha1: list[str] | None = None

    @property
    def fingerprint(self) -> str:
        """What this shard's output depends on in the corpus: its documents and their texts
        (and target texts: a pair whose target alone changed is a changed document)."""
        digest = hashlib.sha256()
        for i, (doc_id, sha) in enumerate(zip(self.doc_ids, self.text_sha1)):
            target = f"\t{self.target_sha1[i]}" if self.target_sha1 is not None else ""
            digest.update(f"{doc_id}\t{sha}{target}\n".encode())
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
        # Per row, in arrays (about 32 bytes a row, not Python strings: millions of rows): the sha1
        # of the text, its characters and which repeat of that text the row is. Hex digests and
        # ids are made for the rows of a shard when it is planned.
        n = len(self.table)
        self.digests = np.zeros((n, 20), dtype=np.uint8)  # (row, sha1 byte)
        self.chars = np.zeros(n, dtype=np.int64)
        row = 0
        for chunk in self.table.column(spec.text_column).chunks:  # a batch at a time (memory-mapped)
            texts = [_as_text(v) for v in chunk.to_pylist()]
            if texts:
                digests = b"".join(hashlib.sha1(t.encode("utf-8")).digest() for t in texts)
                self.digests[row: row + len(texts)] = np.frombuffer(digests, np.uint8).reshape(-1, 20)
                self.chars[row: row + len(texts)] = [len(t) for t in texts]
            row += len(texts)
        self.occurrence = _occurrence(self.digests)
        self._column_ids = self._ids_from_column() if spec.id_column else None

    def __len__(self) -> int:
        return len(self.table)

    def ids(self, rows: np.ndarray) -> list[str]:
        """The doc_ids of `rows`."""
        if self._column_ids is not None:
            return [self._column_ids[r] for r in rows]
        return [sha[:16] if n == 1 else f"{sha[:16]}-{n}" for sha, n in zip(self.sha1(rows), self.occurrence[rows])]

    def sha1(self, rows: np.ndarray) -> list[str]:
        """The hex sha1 of the texts of `rows`."""
        hexed = self.digests[rows].tobytes().hex()
        return [hexed[i: i + 40] for i in range(0, len(hexed), 40)]

    @property
    def doc_ids(self) -> list[str]:
        """Every row's doc_id (a list of the whole corpus: shards use `ids`)."""
        return self.ids(np.arange(len(self)))

    @property
    def text_sha1(self) -> list[str]:
        return self.sha1(np.arange(len(self)))

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
        ids = self.ids(rows)
        order = np.argsort(np.array(ids, dtype=object), kind="stable")
        rows = rows[order]
        targets = self.targets(rows) if self.spec.target_column else self.contexts(rows)
        return ShardDocs(index, rows, [ids[i] for i in order], self.sha1(rows), self.occurrence[rows], self.chars[rows],
                         None if targets is None else [text_sha1(t) for t in targets])

    def texts(self, rows: np.ndarray) -> list[str]:
        """The texts of `rows` as the model reads them: without the corpus.strip matches and the
        corpus.marks brackets (pipeline/groups.py)."""
        raw = [_as_text(v) for v in self.table.column(self.spec.text_column).take(pa.array(rows)).to_pylist()]
        if self._strip is None and self._marks == "none":
            return raw
        return [self._clean(text, row)[0] for text, row in zip(raw, rows)]

    def marks(self, rows: np.ndarray) -> list[list[tuple[int, int]]]:
        """The marked spans of `rows`' texts (corpus.marks), in the texts `texts` returns."""
        raw = [_as_text(v) for v in self.table.column(self.spec.text_column).take(pa.array(rows)).to_pylist()]
        return [self._clean(text, row)[1] for text, row in zip(raw, rows)]

    @property
    def _strip(self) -> str | None:
        return getattr(self.spec, "strip", None)

    @property
    def _marks(self) -> str:
        return getattr(self.spec, "marks", "none")

    def _clean(self, text: str, row: int) -> tuple[str, list[tuple[int, int]]]:
        if self._strip is not None:
            text = re.sub(self._strip, "", text)
        if self._marks == "brackets":
            from .groups import strip_marks

            return strip_marks(text, f"corpus {self.spec.path} row {row}")
        return text, []

    def targets(self, rows: np.ndarray) -> list[str] | None:
        """The target texts of `rows` (corpus.target_column), None without one."""
        if not self.spec.target_column:
            return None
        return [_as_text(v) for v in self.table.column(self.spec.target_column).take(pa.array(rows)).to_pylist()]

    def contexts(self, rows: np.ndarray) -> list[str] | None:
        """The context texts of `rows` (corpus.context_column, generate runs), None without one."""
        if not self.spec.context_column:
            return None
        return [_as_text(v) for v in self.table.column(self.spec.context_column).take(pa.array(rows)).to_pylist()]

    def metadata(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """Metadata columns of `rows`, with their corpus Arrow types."""
        return {c: self.table.column(c).take(pa.array(rows)) for c in self.spec.metadata_columns}

    def sources(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """documents.source_file and source_index of `rows`: the file (relative to the corpus
        folder or the glob's root) and the 1-based line, paragraph or record number; null where
        they do not apply (a whole-file document's index, a save_to_disk or hub corpus)."""
        if SOURCE_FILE not in self.table.column_names:
            return {"source_file": pa.nulls(len(rows), pa.string()), "source_index": pa.nulls(len(rows), pa.int64())}
        take = pa.array(rows, pa.int64())
        return {"source_file": self.table.column(SOURCE_FILE).take(take),
                "source_index": self.table.column(SOURCE_INDEX).take(take)}

    def metadata_schema(self) -> pa.Schema:
        return pa.schema([self.table.schema.field(c) for c in self.spec.metadata_columns])
