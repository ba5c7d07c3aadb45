"""Local corpus files (found by `corpus_find`) read exactly, in batches: text (one document per
file, paragraph or line), JSON / JSON Lines and CSV/TSV, each file as Arrow record batches of the
columns the job names plus where each document came from (`SOURCE_FILE`, `SOURCE_INDEX`). `write_files` streams them into a `corpus_cache.BatchSink`.

These are read here rather than through `datasets` builders because the builders lose what a
user needs to hear about: the line of a bad JSON record (pyarrow counts rows per block), the type
of a value (a number or a list in a text column is stringified, strings gain quote marks when a
column mixes types), the file a row came from. Every file is read as UTF-8 with an optional
byte-order mark, after a check that it is not compressed.

Bounded memory: files are read READ_BYTES at a time and cut into batches of at most BATCH_ROWS
documents or BATCH_BYTES characters, whichever comes first; lines and paragraphs are assembled
across reads. What is held whole: one document (a file in `file` mode, one line), and a file that
is one JSON list (parsed whole; refused over JSON_LIST_MAX_BYTES with the command that turns it
into JSON Lines, which stream).

Blank input, the same rule in every format: a record whose text is empty or whitespace is an
empty document (counted and reported); what is not a record is skipped (blank lines of JSON
Lines and CSV, blank lines between lines or paragraphs of text). In `file` mode the file is the
record, so an empty or blank-only file is one empty document.
"""

from __future__ import annotations

import codecs
import contextlib
import json
from pathlib import Path
from typing import Iterable, Iterator, NoReturn

import numpy as np
import pyarrow as pa

from .corpus_cache import BatchSink, TypeConflict
from .errors import CorpusError

# Where each corpus row came from, carried as columns of the opened corpus (names no user column
# takes) and written to the documents table as source_file and source_index.
SOURCE_FILE = "__attnpipe_source_file"
SOURCE_INDEX = "__attnpipe_source_index"
SOURCE_COLUMNS = (SOURCE_FILE, SOURCE_INDEX)

# Module constants (not job keys) so tests can make them tiny: memory, not output, depends on them.
READ_BYTES = 1 << 20  # bytes read from a file at a time
BATCH_ROWS = 10_000  # documents per record batch, at most
BATCH_BYTES = 8 << 20  # characters of text per record batch, about (a batch ends after the record that passes it)
JSON_LIST_MAX_BYTES = 64 << 20  # a file that is one JSON list is parsed whole: up to this size

TEXT_UNITS = ("file", "paragraph", "line")
COMPRESSED = {b"\x1f\x8b": ("gzip", "gzip -dc"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -dc"),
              b"BZh": ("bzip2", "bzip2 -dc"), b"\xfd7zXZ\x00": ("xz", "xz -dc"), b"PK\x03\x04": ("zip", "unzip -p")}
SCALAR_IDS = (str, int, float, bool)  # bool is an int; listed for the message


TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
              dict: "an object", bytes: "bytes", type(None): "null"}


def _type_name(value) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)


# --- bytes to text --------------------------------------------------------------------------------

def _check_plain(path: Path) -> None:
    """Compressed input is named with the command that decompresses it."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    for magic, (kind, tool) in COMPRESSED.items():
        if head.startswith(magic):
            raise CorpusError(f"corpus file {path} is {kind}-compressed; decompress it first ({tool} {path.name} > "
                              "a plain file): attnpipe reads plain UTF-8 text, JSON and CSV files, and Parquet")


def decode(path: Path) -> str:
    """The whole file's text (a `file`-mode document, a JSON list), a UTF-8 byte-order mark
    dropped (it would otherwise start the first document)."""
    _check_plain(path)
    try:
        return path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        _bad_utf8(path)


@contextlib.contextmanager
def text_file(path: Path, newline: str | None = None):
    """The file as a text stream read READ_BYTES at a time (a byte-order mark dropped; universal
    newlines unless `newline` says otherwise); a byte that is not UTF-8 is located and named."""
    _check_plain(path)
    try:
        f = open(path, encoding="utf-8-sig", newline=newline, buffering=max(READ_BYTES, 2))
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    f._CHUNK_SIZE = max(READ_BYTES, 1)  # what TextIOWrapper decodes at a time (default 8 KiB)
    with f:
        try:
            yield f
        except UnicodeDecodeError:
            _bad_utf8(path)


def _bad_utf8(path: Path) -> NoReturn:
    """Raise naming the first byte that is not UTF-8, and its line (read again in chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(max(READ_BYTES, 4))
            held = decoder.getstate()[0]  # the start of a character cut by the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                data = held + chunk
                line = newlines + data[: exc.start].count(b"\n") + 1
                raise CorpusError(f"corpus file {path} is not valid UTF-8: byte {offset - len(held) + exc.start} "
                                  f"(line {line}) cannot be decoded; re-encode the file as UTF-8") from None
            if not chunk:
                raise CorpusError(f"corpus file {path} is not valid UTF-8; re-encode the file as UTF-8")
            offset += len(chunk)
            newlines += chunk.count(b"\n")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, line) of each line, split at \\n, \\r\\n or \\r only (str.splitlines also
    splits at form feeds and U+2028, which would not match the line numbers an editor shows)."""
    with text_file(path) as f:
        for number, line in enumerate(f, start=1):
            yield number, line[:-1] if line.endswith("\n") else line


def _chunks(items: Iterable, weigh) -> Iterator[list]:
    """`items` in lists of at most BATCH_ROWS, each ending once its weight (characters) passes
    BATCH_BYTES: what bounds the memory a file's reader holds."""
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += weigh(item)
        if len(chunk) >= BATCH_ROWS or size >= BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _batch(columns: dict[str, pa.Array], name: str, index: list[int | None]) -> pa.RecordBatch:
    """The columns plus where each row came from."""
    columns = {c: a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for c, a in columns.items()}
    columns[SOURCE_FILE] = pa.array([name] * len(index), pa.string())
    columns[SOURCE_INDEX] = pa.array(index, pa.int64())
    return pa.RecordBatch.from_pydict(columns)


# --- text ---------------------------------------------------------------------------------------

def _paragraphs(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[str, int]]:
    """(paragraph, its 1-based number): lines up to one or more blank lines."""
    block: list[str] = []
    number = 0
    for _, line in lines:
        if line.strip():
            block.append(line)
        elif block:
            number += 1
            yield "\n".join(block), number
            block = []
    if block:
        yield "\n".join(block), number + 1


def read_text(path: Path, name: str, unit: str, text_column: str) -> Iterator[pa.RecordBatch]:
    """Documents as batches; their 1-based line or paragraph numbers (None in file mode)."""
    if unit == "file":
        docs: Iterable[tuple[str, int | None]] = [(decode(path), None)]
    elif unit == "line":
        docs = ((line, number) for number, line in _lines(path) if line.strip())
    else:
        docs = _paragraphs(_lines(path))
    for chunk in _chunks(docs, lambda doc: len(doc[0])):
        yield _batch({text_column: pa.array([d for d, _ in chunk], pa.string())}, name, [n for _, n in chunk])


# --- JSON and JSON Lines ------------------------------------------------------------------------

def _json_records(path: Path) -> tuple[Iterator[tuple[int, object, int]], str]:
    """((number, value, characters) of each record, "line" or "element"): one record per
    non-blank line of JSON Lines, parsed as they are read, or each element of a file that is one
    JSON list (parsed whole, so refused over JSON_LIST_MAX_BYTES)."""
    with text_file(path) as f:
        start = f.read(1)
        while start.isspace():
            start = f.read(1)
    if start != "[":
        return _json_lines(path), "line"
    size = path.stat().st_size
    if size > JSON_LIST_MAX_BYTES:
        raise CorpusError(f"corpus file {path} is one JSON list of {size / 2**20:.1f} MiB; a list is read whole, "
                          f"up to {JSON_LIST_MAX_BYTES / 2**20:.1f} MiB: give it as JSON Lines, one object per line "
                          f"(jq -c '.[]' {path.name} > {path.stem}.jsonl), which is read a batch at a time")
    try:
        values = json.loads(decode(path))
    except json.JSONDecodeError as exc:
        raise CorpusError(f"corpus file {path}, line {exc.lineno}: not valid JSON: {exc.msg} "
                          f"(column {exc.colno})") from None
    return ((n, v, 0) for n, v in enumerate(values, start=1)), "element"


def _json_lines(path: Path) -> Iterator[tuple[int, object, int]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), len(line)
        except json.JSONDecodeError as exc:
            whole = " (the file holds one JSON value over several lines: give one object per line, or a list of " \
                    "objects)" if _parses(path) else ""
            raise CorpusError(f"corpus file {path}, line {number}: not valid JSON: {exc.msg} (column {exc.colno})"
                              + whole) from None


def _parses(path: Path) -> bool:
    """Whether the whole file is one JSON value (checked only up to JSON_LIST_MAX_BYTES)."""
    if path.stat().st_size > JSON_LIST_MAX_BYTES:
        return False
    try:
        json.loads(decode(path))
        return True
    except (json.JSONDecodeError, CorpusError):
        return False


def read_json(path: Path, name: str, wanted: list[str], text_column: str, id_column: str | None,
              seen: dict[str, None]) -> Iterator[pa.RecordBatch]:
    """Records as batches of the `wanted` columns (null where a record lacks one); the columns
    the file holds are added to `seen`. The text must be a string (or null: an empty document),
    the id a scalar; a column whose values mix types is refused, naming the lines of the first
    of each (over the whole file: `kinds` outlives the batch)."""
    records, where = _json_records(path)
    kinds: dict[str, dict[str, int]] = {c: {} for c in wanted}
    for chunk in _chunks(records, lambda record: record[2]):
        columns: dict[str, list] = {c: [] for c in wanted}
        lines = []
        for number, record, _ in chunk:
            if not isinstance(record, dict):
                raise CorpusError(f"corpus file {path}, {where} {number}: {_type_name(record)}, not a JSON object "
                                  "with named fields")
            seen.update(dict.fromkeys(record))
            lines.append(number)
            for c in wanted:
                columns[c].append(record.get(c))
        _check_text(columns[text_column], lines, path, where, text_column)
        if id_column in columns:
            _check_ids(columns[id_column], lines, path, where, id_column)
        yield _batch({c: _column(values, lines, path, where, c, kinds[c]) for c, values in columns.items()},
                     name, lines)


def _check_text(values: list, lines: list[int], path: Path, where: str, column: str) -> None:
    if set(map(type, values)) <= {str, type(None)}:  # the usual batch: one pass in C
        return
    for value, number in zip(values, lines):
        if value is not None and not isinstance(value, str):
            raise CorpusError(f"corpus file {path}, {where} {number}: corpus.text_column {column!r} holds "
                              f"{_type_name(value)} ({_short(value)}), not a string; store texts as strings")


def _check_ids(values: list, lines: list[int], path: Path, where: str, column: str) -> None:
    if set(map(type, values)) <= {*SCALAR_IDS, type(None)}:
        return
    for value, number in zip(values, lines):
        if value is not None and not isinstance(value, SCALAR_IDS):
            raise CorpusError(f"corpus file {path}, {where} {number}: corpus.id_column {column!r} holds "
                              f"{_type_name(value)} ({_short(value)}); an id must be a string or a number")


def _short(value, width: int = 40) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _column(values: list, lines: list[int], path: Path, where: str, column: str,
            kinds: dict[str, int]) -> pa.Array:
    """One column of a batch as Arrow; values of two kinds in the file (a string and a number,
    say; `kinds` holds the first line of each kind seen so far) are refused rather than
    stringified."""
    new = {TYPE_NAMES.get(t, t.__name__) for t in set(map(type, values))} - {"null"} - kinds.keys()
    for value, number in zip(values, lines) if new else ():  # the first line of a kind not seen before
        name = _type_name(value)
        if name in new:
            kinds[name] = number
            new.discard(name)
            if not new:
                break
    if len(kinds) > 1:
        (a, la), (b, lb) = list(kinds.items())[:2]
        raise CorpusError(f"corpus file {path}: column {column!r} mixes types: {a} ({where} {la}) and {b} "
                          f"({where} {lb}); give every value of a column one type")
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise CorpusError(f"corpus file {path}: column {column!r} cannot be stored as one Arrow type: "
                          f"{str(exc).splitlines()[0]}") from None


# --- CSV and TSV --------------------------------------------------------------------------------

def read_csv(path: Path, name: str, wanted: list[str], delimiter: str, text_column: str, id_column: str | None,
             as_text: set[str], seen: dict[str, None]) -> Iterator[pa.RecordBatch]:
    """The `wanted` columns of a CSV file, BATCH_ROWS rows at a time. The text and id columns
    (and `as_text`) are read as strings (CSV has no types: a text "5" is the text "5", and "NA"
    or "null" is text, not a missing value); pandas infers the types of metadata columns, batch
    by batch (a column whose batches disagree is read again as text: see write_files)."""
    import pandas as pd

    header = check_csv_header(path, delimiter)
    seen.update(dict.fromkeys(header))
    present = [c for c in wanted if c in header]
    strings = [c for c in (text_column, id_column) if c in present]
    na_default = getattr(getattr(pd._libs, "parsers", None), "STR_NA_VALUES", {"", "NA", "N/A", "NaN", "nan", "null"})
    row = 1
    with text_file(path, newline="") as f:
        try:
            frames = pd.read_csv(f, sep=delimiter, usecols=present or None, keep_default_na=False,
                                 dtype={c: str for c in strings + sorted(as_text)}, chunksize=_csv_batch_rows(path),
                                 na_values={c: list(na_default) for c in present if c not in strings})
            for frame in frames:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                n = len(frame)
                columns = {c: table.column(c) if c in present else pa.nulls(n) for c in wanted}
                for c in strings:  # text and ids as plain strings, whatever pandas' string dtype
                    columns[c] = columns[c].cast(pa.string())
                yield _batch(columns, name, list(range(row, row + n)))
                row += n
        except UnicodeDecodeError:  # a ValueError too: text_file names the byte and line
            raise
        except (ValueError, pd.errors.ParserError, pa.ArrowException) as exc:
            raise CorpusError(f"could not read corpus file {path} as CSV: {str(exc).strip().splitlines()[0]}") from None


def _csv_batch_rows(path: Path) -> int:
    """Rows per batch for pandas' chunks: BATCH_ROWS, fewer where the file's first rows say that
    many would pass BATCH_BYTES (pandas cuts chunks by rows only)."""
    with open(path, "rb") as f:
        sample = f.read(1 << 16)
    row_bytes = len(sample) / max(sample.count(b"\n"), 1)
    return max(1, min(BATCH_ROWS, int(BATCH_BYTES / row_bytes)))


def check_csv_header(path: Path, delimiter: str) -> list[str]:
    """The header's column names. Refused: a name given twice (pandas would rename the second
    `text.1` and read the first), and a first row with more fields than the header (pandas reads
    it as an index plus shifted columns: the text column silently holds another field)."""
    import csv

    with text_file(path, newline="") as f:
        try:
            rows = (row for row in csv.reader(f, delimiter=delimiter) if row)
            header, first = next(rows, None), next(rows, None)
        except csv.Error:
            return []  # e.g. a field over csv's size limit; the loader reports real syntax errors
    header = header or []
    for i, col in enumerate(header):
        if col in header[:i]:
            raise CorpusError(f"corpus file {path}: the header names column {col!r} twice (columns "
                              f"{header.index(col) + 1} and {i + 1}); give every column its own name")
    if header and first and len(first) > len(header):
        raise CorpusError(f"corpus file {path}: the first row has {len(first)} fields but the header has "
                          f"{len(header)} ({', '.join(header)}); quote fields that contain {delimiter!r}")
    return header


# --- all of a corpus's files --------------------------------------------------------------------

def write_files(sink: BatchSink, files: list[Path], names: list[str], fmt: str, unit: str, wanted: list[str],
                text_column: str, id_column: str | None) -> list[str]:
    """Every file's batches into `sink`, in order; the column names the files hold."""
    seen: dict[str, None] = {}
    for path, name in zip(files, names):
        sink.begin_file(path)
        as_text: set[str] = set()
        while True:
            if fmt == "text":
                batches = read_text(path, name, unit, text_column)
            elif fmt == "json":
                batches = read_json(path, name, wanted, text_column, id_column, seen)
            else:
                delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
                batches = read_csv(path, name, wanted, delimiter, text_column, id_column, as_text, seen)
            try:
                for batch in batches:
                    sink.write(batch)
                break
            except TypeConflict as conflict:
                if fmt != "csv" or conflict.column in as_text:
                    raise CorpusError(f"corpus file {path}: column {conflict.column!r} cannot be stored as one "
                                      f"Arrow type: it holds {conflict.old} and {conflict.new} values") from None
                # pandas typed the column differently in two batches (numbers, then words): read as
                # a whole file would be, as text
                sink.rollback_file()
                as_text.add(conflict.column)
    if sink.schema is None:  # no file had a record: an empty table of the columns
        columns = [text_column] if fmt == "text" else wanted
        sink.write(_batch({c: pa.array([], pa.string() if c == text_column else pa.null()) for c in columns}, "", []))
    return [text_column] if fmt == "text" else list(seen)


# --- where rows came from -----------------------------------------------------------------------

def with_row_numbers(table: pa.Table, names: list[str], rows: list[int]) -> pa.Table:
    """Source columns for a table read from several files in order (Parquet): each file's name
    and the 1-based row number within it."""
    files = pa.chunked_array([pa.repeat(pa.scalar(n, pa.string()), r) for n, r in zip(names, rows)], pa.string())
    index = pa.array(np.concatenate([np.arange(1, r + 1) for r in rows]) if rows else [], pa.int64())
    return table.append_column(SOURCE_FILE, files).append_column(SOURCE_INDEX, index)
