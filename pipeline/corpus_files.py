"""Local corpus files found (a folder, a glob with `**`, symlinks checked) and read exactly: text (one document per file, paragraph or line), JSON / JSON
Lines and CSV/TSV, each file into an Arrow table of the columns the job names plus where each
document came from (`SOURCE_FILE`, `SOURCE_INDEX`).

These are read here rather than through `datasets` builders because the builders lose what a
user needs to hear about: the line of a bad JSON record (pyarrow counts rows per block), the type
of a value (a number or a list in a text column is stringified, strings gain quote marks when a
column mixes types), the file a row came from. Every file is decoded once, as UTF-8 with an
optional byte-order mark, after a check that it is not compressed.

Blank input, the same rule in every format: a record whose text is empty or whitespace is an
empty document (counted and reported); what is not a record is skipped (blank lines of JSON
Lines and CSV, blank lines between lines or paragraphs of text). In `file` mode the file is the
record, so an empty or blank-only file is one empty document.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from .errors import CorpusError

# Where each corpus row came from, carried as columns of the opened corpus (names no user column
# takes) and written to the documents table as source_file and source_index.
SOURCE_FILE = "__attnpipe_source_file"
SOURCE_INDEX = "__attnpipe_source_index"
SOURCE_COLUMNS = (SOURCE_FILE, SOURCE_INDEX)

TEXT_UNITS = ("file", "paragraph", "line")
WILDCARDS = "*?["
COMPRESSED = {b"\x1f\x8b": ("gzip", "gzip -dc"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -dc"),
              b"BZh": ("bzip2", "bzip2 -dc"), b"\xfd7zXZ\x00": ("xz", "xz -dc"), b"PK\x03\x04": ("zip", "unzip -p")}
SCALAR_IDS = (str, int, float, bool)  # bool is an int; listed for the message


def _type_name(value) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", bytes: "bytes", type(None): "null"}.get(type(value), type(value).__name__)


def decode(path: Path) -> str:
    """The file's text: compressed input named, the first undecodable byte located, a UTF-8
    byte-order mark dropped (it would otherwise start the first document or header name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    for magic, (kind, tool) in COMPRESSED.items():
        if data.startswith(magic):
            raise CorpusError(f"corpus file {path} is {kind}-compressed; decompress it first ({tool} {path.name} > "
                              "a plain file): attnpipe reads plain UTF-8 text, JSON and CSV files, and Parquet")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CorpusError(f"corpus file {path} is not valid UTF-8: byte {exc.start} (line {line}) cannot be "
                          "decoded; re-encode the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only (str.splitlines also splits at form feeds and
    U+2028, which would not match the line numbers an editor shows)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


# --- which files ---------------------------------------------------------------------------------

def broken_link(path: Path) -> str | None:
    """Why `path` (which exists as a name) cannot be opened: a dangling symlink or a loop."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        target = os.readlink(path) if os.path.islink(path) else "?"
        return f"is a dangling symlink (to {target})" if os.path.islink(path) else f"cannot be read: {exc.strerror}"


def _usable(paths: list[Path], where: str) -> list[Path]:
    """The files among `paths` (folders skipped); a broken link is refused, not skipped."""
    out = []
    for p in paths:
        problem = broken_link(p)
        if problem:
            raise CorpusError(f"corpus {where}: {p} {problem}; remove it or fix the link")
        if p.is_file():
            out.append(p)
    return out


def _glob_root(path: Path) -> Path:
    """The folder a pattern's wildcards start below: the parent of its first wildcard part."""
    parts = path.parts
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in WILDCARDS))
    return Path(*parts[:first]) if first else Path(".")


def _match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Glob matching by path component: `**` is any number of folders; names starting with '.'
    match only a pattern part that starts with '.' (as glob)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return bool(parts) and (not parts[0].startswith(".") or pattern[0].startswith(".")) \
        and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def _walk(root: Path, pattern: tuple[str, ...], where: str) -> list[Path]:
    """Files under `root` matching a `**` pattern. Symlinked folders are followed once: a link
    back to a folder already walked (a loop) is refused rather than walked forty levels deep."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=None):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            raise CorpusError(f"corpus {where}: {folder} is a symlink to a folder that is already part of the "
                              "corpus (a loop); remove the link or narrow the pattern")
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not broken_link(Path(folder) / d))
        rel = Path(folder).relative_to(root).parts
        found += [Path(folder) / n for n in names if _match(rel + (n,), pattern)]
    return sorted(found)


def pattern_files(path: Path, where: str) -> tuple[list[Path], Path]:
    root = _glob_root(path)
    if "**" in path.parts:
        files = _walk(root, path.relative_to(root).parts, where) if root.is_dir() else []
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)))
    return _usable(files, where), root


def folder_files(path: Path, suffixes) -> list[Path]:
    """The corpus files of a folder (not its subfolders), by name."""
    entries = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
    return _usable(entries, f"folder {path}")


# --- text ---------------------------------------------------------------------------------------

def text_documents(text: str, unit: str) -> tuple[list[str], list[int | None]]:
    """(documents, their 1-based line or paragraph numbers; None in file mode)."""
    if unit == "file":
        return [text], [None]
    lines = _lines(text)
    if unit == "line":
        kept = [(line, i + 1) for i, line in enumerate(lines) if line.strip()]
        return [t for t, _ in kept], [n for _, n in kept]
    docs: list[str] = []
    block: list[str] = []
    for line in lines + [""]:  # a final blank line closes the last paragraph
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    return docs, list(range(1, len(docs) + 1))


def read_text(path: Path, name: str, unit: str, text_column: str) -> pa.Table:
    docs, index = text_documents(decode(path), unit)
    return _with_source(pa.table({text_column: pa.array(docs, pa.string())}), name, index)


# --- JSON and JSON Lines ------------------------------------------------------------------------

def _json_records(path: Path, text: str) -> tuple[Iterator[tuple[int, object]], str]:
    """((number, value) of each record, "line" or "element"): one record per non-blank line of
    JSON Lines (parsed as they are read, so only the wanted columns are kept), or each element
    of a file that is one JSON list."""
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"corpus file {path}, line {exc.lineno}: not valid JSON: {exc.msg} "
                              f"(column {exc.colno})") from None
        if isinstance(values, list):
            return enumerate(values, start=1), "element"
    return _json_lines(path, text), "line"


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            whole = " (the file holds one JSON value over several lines: give one object per line, or a list of " \
                    "objects)" if _parses(text) else ""
            raise CorpusError(f"corpus file {path}, line {number}: not valid JSON: {exc.msg} (column {exc.colno})"
                              + whole) from None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def read_json(path: Path, name: str, wanted: list[str], text_column: str, id_column: str | None) -> pa.Table:
    """Records -> a table of the `wanted` columns (null where a file lacks one; the schema
    metadata "columns" lists the columns the file holds). The text must be a string (or null: an empty document), the id a scalar;
    a column whose values mix types is refused, naming the lines of the first of each."""
    records, where = _json_records(path, decode(path))
    columns: dict[str, list] = {c: [] for c in wanted}
    seen: dict[str, None] = {}
    lines = []
    for number, record in records:
        if not isinstance(record, dict):
            raise CorpusError(f"corpus file {path}, {where} {number}: {_type_name(record)}, not a JSON object "
                              "with named fields")
        seen.update(dict.fromkeys(record))
        lines.append(number)
        for c in wanted:
            columns[c].append(record.get(c))
    _check_text(columns.get(text_column, []), lines, path, where, text_column)
    if id_column in columns:
        _check_ids(columns[id_column], lines, path, where, id_column)
    # A column this file lacks is null here (another file may have it; open_corpus checks that
    # some file does, from the "columns" metadata).
    table = pa.table({c: _column(values, lines, path, where, c) if c in seen else pa.nulls(len(lines))
                      for c, values in columns.items()}) if wanted else pa.table({})
    table = _with_source(table, name, lines)
    return table.replace_schema_metadata({"columns": json.dumps(list(seen))})


def _check_text(values: list, lines: list[int], path: Path, where: str, column: str) -> None:
    for value, number in zip(values, lines):
        if value is not None and not isinstance(value, str):
            raise CorpusError(f"corpus file {path}, {where} {number}: corpus.text_column {column!r} holds "
                              f"{_type_name(value)} ({_short(value)}), not a string; store texts as strings")


def _check_ids(values: list, lines: list[int], path: Path, where: str, column: str) -> None:
    for value, number in zip(values, lines):
        if value is not None and not isinstance(value, SCALAR_IDS):
            raise CorpusError(f"corpus file {path}, {where} {number}: corpus.id_column {column!r} holds "
                              f"{_type_name(value)} ({_short(value)}); an id must be a string or a number")


def _short(value, width: int = 40) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _column(values: list, lines: list[int], path: Path, where: str, column: str) -> pa.Array:
    """One column as Arrow; values of two kinds (a string and a number, say) are refused
    rather than stringified."""
    kinds: dict[str, int] = {}
    for value, number in zip(values, lines):
        if value is not None:
            kinds.setdefault("a number" if isinstance(value, (int, float)) and not isinstance(value, bool)
                             else _type_name(value), number)
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

def read_csv(path: Path, name: str, wanted: list[str], delimiter: str, text_column: str,
             id_column: str | None) -> pa.Table:
    """The `wanted` columns of a CSV file. The text and id columns are read as strings (CSV has
    no types: a text "5" is the text "5", and "NA" or "null" is text, not a missing value);
    pandas infers the types of metadata columns."""
    import pandas as pd

    text = decode(path)
    header = check_csv_header(path, text, delimiter)
    present = [c for c in wanted if c in header]
    as_text = [c for c in (text_column, id_column) if c in present]
    na_default = getattr(getattr(pd._libs, "parsers", None), "STR_NA_VALUES", {"", "NA", "N/A", "NaN", "nan", "null"})
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter, usecols=present or None, dtype={c: str for c in as_text},
                            keep_default_na=False,
                            na_values={c: list(na_default) for c in present if c not in as_text})
    except (ValueError, pd.errors.ParserError) as exc:
        raise CorpusError(f"could not read corpus file {path} as CSV: {str(exc).strip().splitlines()[0]}") from None
    table = pa.Table.from_pandas(frame, preserve_index=False)
    n = len(frame)
    table = pa.table({c: table.column(c) if c in present else pa.nulls(n) for c in wanted}) if wanted \
        else pa.table({})
    if text_column in present:  # text and ids as plain strings, whatever pandas' string dtype
        table = table.set_column(wanted.index(text_column), text_column, table.column(text_column).cast(pa.string()))
    if id_column in present:
        table = table.set_column(wanted.index(id_column), id_column, table.column(id_column).cast(pa.string()))
    table = _with_source(table, name, list(range(1, n + 1)))
    return table.replace_schema_metadata({"columns": json.dumps(header)})


def check_csv_header(path: Path, text: str, delimiter: str) -> list[str]:
    """The header's column names. Refused: a name given twice (pandas would rename the second
    `text.1` and read the first), and a first row with more fields than the header (pandas reads
    it as an index plus shifted columns: the text column silently holds another field)."""
    import csv

    try:
        rows = (row for row in csv.reader(io.StringIO(text), delimiter=delimiter) if row)
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


# --- where rows came from -----------------------------------------------------------------------

def _with_source(table: pa.Table, name: str, index: list[int | None] | np.ndarray) -> pa.Table:
    n = len(index)
    table = table.append_column(SOURCE_FILE, pa.repeat(pa.scalar(name, pa.string()), n))
    return table.append_column(SOURCE_INDEX, pa.array(index, pa.int64()))


def with_row_numbers(table: pa.Table, names: list[str], rows: list[int]) -> pa.Table:
    """Source columns for a table read from several files in order (Parquet): each file's name
    and the 1-based row number within it."""
    files = pa.chunked_array([pa.repeat(pa.scalar(n, pa.string()), r) for n, r in zip(names, rows)], pa.string())
    index = pa.array(np.concatenate([np.arange(1, r + 1) for r in rows]) if rows else [], pa.int64())
    return table.append_column(SOURCE_FILE, files).append_column(SOURCE_INDEX, index)
