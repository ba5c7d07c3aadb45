"""The corpus cache: local corpus files read once, in batches, into an Arrow file that every
later open memory-maps.

`corpus_files` reads each file in chunks and yields Arrow record batches of the wanted columns;
`BatchSink` streams them into one Arrow IPC stream file (the format of `datasets`' own cache), so
reading a corpus holds one batch at a time, and the opened table is memory-mapped: its pages come
from disk as they are used and are shared by every process that maps the same file (each Dask
worker opens the corpus). A corpus of several GB needs little more memory than a batch.

Where: $ATTNPIPE_CACHE/corpus/ (default ~/.cache/attnpipe/corpus/), one `<key>.arrow` per
corpus, named by a hash of the files (path, size, mtime_ns, ctime_ns), the options that change
the table and READER_VERSION. Commit order: the table is written to a `.part` file, renamed to
`<key>.arrow`, then `<key>.json` (columns, rows) is renamed into place last: an entry without its
.json is incomplete and is rebuilt, so a reader killed midway never leaves a cache that looks
complete. Processes that open the same corpus at once wait on a lock and map the first one's
file. A cache folder that cannot be written falls back to a private temp folder (never an error).
Entries are never evicted: the folder can be deleted at any time.

A file changed less than RACY_NS before the read began is read into a private file, not the
cache: file times are coarse (a few ms, seconds on some file systems), so a change made just after
the read could keep the same mtime and the cache would serve the old text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pyarrow as pa
import pyarrow.ipc as ipc

from .errors import CorpusError

READER_VERSION = 1  # bump when the table read from the same files changes
RACY_NS = 2_000_000_000  # files changed this recently are not cached (see the module docstring)
STALE_PART_S = 24 * 3600  # a .part file this old belongs to a reader that was killed


def cache_folder() -> Path:
    return Path(os.environ.get("ATTNPIPE_CACHE") or Path.home() / ".cache" / "attnpipe") / "corpus"


def cache_key(files: list[Path], options: dict) -> tuple[str, bool]:
    """(the key of these files read with these options, whether the entry may be shared: no file
    changed within RACY_NS)."""
    now = time.time_ns()
    stats, fresh = [], False
    for f in files:
        try:
            st = f.stat()
        except OSError as exc:
            raise CorpusError(f"cannot read corpus file {f}: {exc.strerror or exc}") from None
        stats.append([str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        fresh |= max(st.st_mtime_ns, st.st_ctime_ns) > now - RACY_NS
    payload = json.dumps({"files": stats, "options": options, "version": READER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32], not fresh


Build = Callable[["BatchSink"], list[str]]  # writes the corpus's batches; returns its column names


class Opened(NamedTuple):
    table: pa.Table  # memory-mapped
    columns: list[str]  # the column names the files hold
    path: Path | None  # the cache file; None for a private file (already unlinked)
    key: str


def open_cached(files: list[Path], options: dict, build: Build) -> Opened:
    """The corpus table, mapped from the cache, or read into it first by `build`."""
    key, shareable = cache_key(files, options)
    folder = cache_folder()
    if shareable and _writable(folder):
        hit = _open_entry(folder, key)
        if hit:
            return hit
        with _lock(folder / f"{key}.lock"):
            hit = _open_entry(folder, key)  # another process built it while this one waited
            if hit:
                return hit
            with contextlib.suppress(OSError):  # the folder cannot be written after all: private
                return _build(folder, key, build, publish=True)
    if _writable(folder):  # private, but on the cache's disk (a temp folder may be in RAM)
        with contextlib.suppress(OSError):
            return _build(folder, key, build, publish=False)
    private = Path(tempfile.mkdtemp(prefix="attnpipe-corpus-"))
    try:
        return _build(private, key, build, publish=False)
    except OSError as exc:
        raise CorpusError(f"cannot write the corpus's Arrow file in {folder} nor in {private}: "
                          f"{exc.strerror or exc}; set ATTNPIPE_CACHE to a writable folder") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the mapping outlives the names (POSIX)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def _map(path: Path) -> pa.Table:
    return ipc.open_stream(pa.memory_map(str(path))).read_all()


def _open_entry(folder: Path, key: str) -> Opened | None:
    """A complete entry, memory-mapped; None when absent, incomplete or damaged (then rebuilt)."""
    path = folder / f"{key}.arrow"
    try:
        meta = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
        table = _map(path)
    except (OSError, ValueError, pa.ArrowException):
        return None
    if meta.get("version") != READER_VERSION or meta.get("rows") != table.num_rows \
            or meta.get("bytes") != path.stat().st_size:  # truncated or replaced (bit flips go unseen)
        return None
    return Opened(table, meta["columns"], path, key)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (released by the OS if the holder dies); none where the
    platform or the folder gives none: then two processes may build the same entry, harmlessly."""
    try:
        import fcntl

        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(folder: Path, key: str, build: Build, publish: bool) -> Opened:
    _sweep(folder)
    part = folder / f"{key}.{os.getpid()}.{secrets.token_hex(4)}.part"
    sink = BatchSink(part)
    try:
        columns = build(sink)
        rows = sink.close()
        if not publish:
            return Opened(_map(part), columns, None, key)
        final = folder / f"{key}.arrow"
        size = part.stat().st_size
        os.replace(part, final)
        _write_json(folder / f"{key}.json", {"columns": columns, "rows": rows, "bytes": size,
                                             "version": READER_VERSION})
        return Opened(_map(final), columns, final, key)
    finally:
        sink.abort()
        with contextlib.suppress(OSError):  # POSIX: a mapped file's pages outlive its name
            part.unlink(missing_ok=True)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def _sweep(folder: Path) -> None:
    """Remove the .part files of readers killed long ago (a live reader's file is younger)."""
    cutoff = time.time() - STALE_PART_S
    for part in folder.glob("*.part*"):
        with contextlib.suppress(OSError):
            if part.stat().st_mtime < cutoff:
                part.unlink()


# --- writing batches ----------------------------------------------------------------------------

class TypeConflict(Exception):
    """Two batches of one file type a column in ways no single Arrow type holds."""

    def __init__(self, column: str, old: pa.DataType, new: pa.DataType):
        super().__init__(f"column {column!r}: {old} and {new}")
        self.column, self.old, self.new = column, old, new


class BatchSink:
    """Record batches streamed into one Arrow IPC stream file, one schema for all of them.

    Types are unified as batches arrive. Within a file a column's type widens as pa.array would
    type all of the file's values at once (null -> any type, integer -> float, a struct gains
    fields): the file's batches written so far are rewritten with the wider type, a rare case.
    Between files only a null column takes another file's type, as pa.concat_tables did: numbers
    in one file and strings in another are refused, naming both files.
    """

    def __init__(self, path: Path):
        self.path = path
        self.schema: pa.Schema | None = None
        self.owner: dict[str, Path] = {}  # column -> the file whose values set its type
        self.batches = self.rows = 0
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._file: Path | None = None
        self._saved: tuple = (None, {}, 0, 0)

    def begin_file(self, path: Path) -> None:
        self._file = path
        self._saved = (self.schema, dict(self.owner), self.batches, self.rows)

    def rollback_file(self) -> None:
        """Drop the current file's batches (it is read again, e.g. with a column as text)."""
        schema, self.owner, keep, self.rows = self._saved
        self._saved = (schema, dict(self.owner), keep, self.rows)
        self._rewrite(schema, keep)

    def write(self, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self._rewrite(batch.schema, 0)
            self.owner = {f.name: self._file for f in batch.schema if not pa.types.is_null(f.type)}
        elif batch.num_rows == 0:
            return
        schema = self._unify(batch.schema)
        if schema != self.schema:
            self._rewrite(schema, self.batches)
        self._writer.write_batch(cast_batch(batch, self.schema))
        self.batches += 1
        self.rows += batch.num_rows

    def close(self) -> int:
        """Finish the file; the number of rows written."""
        self._writer.close()
        self._writer = None
        return self.rows

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def _unify(self, new: pa.Schema) -> pa.Schema:
        fields = []
        for old, field in zip(self.schema, new):
            within = self.owner.get(old.name) in (None, self._file)
            merged = widen(old.type, field.type, within)
            if merged is None and within:
                raise TypeConflict(old.name, old.type, field.type)
            if merged is None:
                raise CorpusError(f"corpus column {old.name!r} holds {old.type} values in {self.owner[old.name]} "
                                  f"but {field.type} in {self._file}; give every value of a column one type")
            if not pa.types.is_null(merged):
                self.owner.setdefault(old.name, self._file)
            fields.append(old.with_type(merged))
        return pa.schema(fields)

    def _rewrite(self, schema: pa.Schema | None, keep: int) -> None:
        """Start the file again with `schema`, keeping its first `keep` batches, cast."""
        self.abort()
        old = self.path.with_name(self.path.name + ".old")
        if self.path.exists():
            os.replace(self.path, old)
        self.schema, self.batches = schema, 0
        if schema is not None:
            self._writer = ipc.new_stream(str(self.path), schema)
        try:
            if keep and old.exists():
                for batch in ipc.open_stream(pa.memory_map(str(old))):
                    if self.batches == keep:
                        break
                    self._writer.write_batch(cast_batch(batch, schema))
                    self.batches += 1
        finally:
            old.unlink(missing_ok=True)


def widen(a: pa.DataType, b: pa.DataType, within: bool) -> pa.DataType | None:
    """One type for values of types `a` and `b` (None: there is none). Null takes any type;
    `within` one file, numbers widen to float64 and structs merge their fields."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    numeric = (pa.types.is_integer(a) or pa.types.is_floating(a)) and (pa.types.is_integer(b) or pa.types.is_floating(b))
    if within and numeric and not (pa.types.is_integer(a) and pa.types.is_integer(b)):
        return pa.float64()
    if pa.types.is_list(a) and pa.types.is_list(b):
        value = widen(a.value_type, b.value_type, within)
        return pa.list_(value) if value is not None else None
    if pa.types.is_struct(a) and pa.types.is_struct(b) and (within or a.names == b.names):
        fields = {f.name: f.type for f in a}
        for f in b:
            fields[f.name] = widen(fields[f.name], f.type, within) if f.name in fields else f.type
        return None if None in fields.values() else pa.struct(list(fields.items()))
    return None


def cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with the types of `schema` (its columns in the same order)."""
    if batch.schema == schema:
        return batch
    columns = []
    for column, field in zip(batch.columns, schema):
        if column.type == field.type:
            columns.append(column)
        elif pa.types.is_null(column.type) or pa.types.is_null(field.type):  # all values null
            columns.append(pa.nulls(len(column), field.type))
        else:  # through Python values: pa.array fills a struct's missing fields, widens ints
            try:
                columns.append(pa.array(column.to_pylist(), field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise CorpusError(f"corpus column {field.name!r} cannot be stored as one Arrow type "
                                  f"({field.type}): {str(exc).splitlines()[0]}") from None
    return pa.RecordBatch.from_arrays(columns, schema=schema)
