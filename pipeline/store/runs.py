"""Sorted runs spilled to disk and merged: the external sort behind the writer's row-group layout.

A one-document query reads every row group whose statistics admit the document, so the cheap
layout puts each document's rows in as few row groups as possible. The model's batches do not
arrive that way: windows are pooled and sorted by length before batching, so one writer flush
holds documents from all over a chunk of the corpus. The writer therefore keeps each flush as a
sorted *run* (in memory within a small budget, else in an Arrow IPC file in the staging folder,
never committed) and, when the documents of a stretch are complete (`ShardWriter.seal`), merges
the runs and writes row groups that each cover one band of heads and a narrow, contiguous range
of documents.

Rows are ordered by an int64 key, (head band, doc_index, window_index) packed into one integer,
so the merge compares numbers. A run is stored as segments, one per band, so segments of
different bands never overlap and only the runs that overlap in key range are open at once; when
more overlap than the memory budget allows, groups of them are merged into longer runs first.
Memory: about two IPC batches (`BATCH_ROWS` rows) per open run, whatever the size of the data.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

BATCH_ROWS = 1 << 13  # rows per IPC batch: the unit of reading, so the memory per open run
_BAND_SHIFT, _DOC_SHIFT = 56, 24  # key = band << 56 | doc_index << 24 | window_index
_INF = np.iinfo(np.int64).max
HEAD_BANDS = 3  # heads of a layer fall into this many bands; a row group never mixes bands
FOOTER_SHARE = 0.05  # of a stretch's data bytes, at most, in row-group metadata
TAIL_READ = 64 << 10  # pyarrow's first read of a file's end; a longer footer costs a second read
KEY = "__key"  # the spilled batches' column of merge keys


def head_band(head: np.ndarray, heads: int | None) -> np.ndarray:
    """The band of each head: `HEAD_BANDS` contiguous bands of the layer's `heads`, or one band
    per head when the head count is unknown."""
    head = np.asarray(head, dtype=np.int64)
    if not heads or heads <= HEAD_BANDS:
        return head
    return np.minimum(head * HEAD_BANDS // heads, HEAD_BANDS - 1)


def sort_keys(table: pa.Table | pa.RecordBatch, heads: int | None) -> np.ndarray:
    """Each row's merge key: (head band, doc_index, window_index) in one int64."""
    n = table.num_rows
    names = table.schema.names
    band = head_band(table.column("head").to_numpy(), heads) if "head" in names else np.zeros(n, np.int64)
    doc = table.column("doc_index").to_numpy().astype(np.int64)
    window = (table.column("window_index").to_numpy().astype(np.int64)
              if "window_index" in names else np.zeros(n, np.int64))
    return (band << _BAND_SHIFT) | (doc << _DOC_SHIFT) | window


def key_band(keys: np.ndarray) -> np.ndarray:
    return keys >> _BAND_SHIFT


def key_doc(keys: np.ndarray) -> np.ndarray:
    return (keys >> _DOC_SHIFT) & 0xFFFFFFFF


@dataclass
class Segment:
    """One band of one run: consecutive batches of a spill file, sorted, keys first..last."""

    spill: "SpillFile"
    batches: list[int]
    first: int
    last: int
    rows: int


class Budget:
    """Bytes of runs that may stay in memory, shared by one shard's writers (and seal threads):
    small outputs never touch the disk; past the budget, runs go to IPC files."""

    def __init__(self, free: int):
        self.free = free
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.free < n:
                return False
            self.free -= n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.free += n


@dataclass
class SpillFile:
    """Sorted runs, stored batch by batch in memory while the budget allows, else in an IPC file,
    read back by batch index. `compress`: LZ4 (about 5 bytes per per-head edge row against 24
    raw, at about twice the time of raw)."""

    path: Path
    schema: pa.Schema
    budget: Budget | None = None
    compress: bool = False
    disk_bytes: int = 0  # Arrow bytes of the batches on disk
    segments: list[Segment] = field(default_factory=list)
    _memory: list | None = field(default_factory=list)  # the batches, until they go to disk
    _kept: int = 0
    _writer: ipc.RecordBatchFileWriter | None = None
    _reader: ipc.RecordBatchFileReader | None = None
    _count: int = 0
    _held: list = field(default_factory=list)

    def append(self, table: pa.Table, keys: np.ndarray) -> None:
        """Rows that continue a sorted stream (keys at or above the last appended): held until
        a few batches' worth, then stored like `add_run`. `end_stream()` stores the rest."""
        self._held.append((table, keys))
        if sum(len(k) for _, k in self._held) >= 4 * BATCH_ROWS:
            self.end_stream()

    def end_stream(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self.add_run(pa.concat_tables([t for t, _ in held]), np.concatenate([k for _, k in held]))

    def add_run(self, table: pa.Table, keys: np.ndarray) -> None:
        """A sorted run (rows ascending by `keys`), stored as one segment per band."""
        if table.num_rows == 0:
            return
        assert self._reader is None, "a spill file is read only once it is complete"
        band = key_band(keys)
        starts = np.concatenate([[0], np.flatnonzero(band[1:] != band[:-1]) + 1, [len(keys)]])
        for a, b in zip(starts[:-1], starts[1:]):
            ids = []
            for lo in range(int(a), int(b), BATCH_ROWS):
                hi = min(lo + BATCH_ROWS, int(b))
                part = table.slice(lo, hi - lo).append_column(KEY, pa.array(keys[lo:hi]))
                self._store(part.combine_chunks().to_batches()[0])
                ids.append(self._count)
                self._count += 1
            self.segments.append(Segment(self, ids, int(keys[a]), int(keys[b - 1]), int(b - a)))

    def _store(self, batch: pa.RecordBatch) -> None:
        if self._memory is not None:
            if self.budget is not None and self.budget.take(batch.nbytes):
                self._kept += batch.nbytes
                self._memory.append(batch)
                return
            self._to_disk()
        self._write(batch)

    def _to_disk(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.path), "wb")
        options = ipc.IpcWriteOptions(compression="lz4" if self.compress else None)
        self._writer = ipc.new_file(self._sink, self.schema.append(pa.field(KEY, pa.int64())), options=options)
        for batch in self._memory:
            self._write(batch)
        self._release()

    @property
    def stored_bytes(self) -> int:
        """Arrow bytes of the runs stored so far, in memory and on disk."""
        return self.disk_bytes + self._kept

    def _write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.disk_bytes += batch.nbytes

    def _release(self) -> None:
        if self.budget is not None:
            self.budget.give(self._kept)
        self._kept, self._memory = 0, None

    def batch(self, i: int) -> pa.RecordBatch:
        self.end_stream()
        if self._memory is not None:
            return self._memory[i]
        if self._reader is None:
            self.close_writer()
            self._reader = ipc.open_file(pa.OSFile(str(self.path), "rb"))
        return self._reader.get_batch(i)

    def close_writer(self) -> None:
        self.end_stream()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None

    def remove(self) -> None:
        self.close_writer()
        self._release()
        self._reader = None
        self.path.unlink(missing_ok=True)


class _Cursor:
    """The loaded, not yet emitted rows of one segment."""

    def __init__(self, seg: Segment):
        self.seg = seg
        self.todo = deque(seg.batches)
        self.tables: list[pa.Table] = []
        self.keys = np.empty(0, np.int64)
        self.load()

    def load(self) -> None:
        batch = self.seg.spill.batch(self.todo.popleft())
        self.tables = [pa.concat_tables(self.tables)] if len(self.tables) > 1 else self.tables
        self.tables.append(pa.Table.from_batches([batch.drop_columns([KEY])]))
        self.keys = np.concatenate([self.keys, batch.column(KEY).to_numpy()])

    @property
    def bound(self) -> int:
        """Rows below this key are all loaded."""
        return int(self.keys[-1]) if self.todo else _INF

    @property
    def done(self) -> bool:
        return not self.todo and len(self.keys) == 0

    def take_below(self, bound: int) -> tuple[pa.Table, np.ndarray] | None:
        i = int(np.searchsorted(self.keys, bound, side="left"))
        if i == 0:
            return None
        table = pa.concat_tables(self.tables)
        piece, keys = table.slice(0, i), self.keys[:i]
        self.tables, self.keys = [table.slice(i)], self.keys[i:]
        if len(self.keys) == 0 and self.todo:
            self.load()
        return piece, keys


def merge(segments: list[Segment], order: list[str]):
    """Sorted pieces (table, keys) of all rows of `segments`, ascending by key, then by the
    columns `order` inside one key. Opens a segment only when the merge reaches its first key.
    Each step emits the rows below the median of the open segments' loaded ends (the segments
    behind it load one batch more), so a step emits about half a batch per open segment rather
    than one batch in all: the per-step cost is per segment. Memory: about two batches each."""
    pending = deque(sorted(segments, key=lambda s: s.first))
    active: list[_Cursor] = []
    while active or pending:
        if not active:
            active.append(_Cursor(pending.popleft()))
        ends = sorted(c.bound for c in active if c.bound < _INF) or [_INF]
        bound = min([ends[len(ends) // 2]] + ([pending[0].first] if pending else []))
        for c in active:
            while c.bound < bound:
                c.load()
        pieces = [p for c in active if (p := c.take_below(bound)) is not None]
        if pieces:
            yield _ordered(pieces, order)
        else:  # rows at the bound key continue in a next batch or in a segment not yet open
            for c in active:
                if c.bound == bound and c.todo:
                    c.load()
            while pending and pending[0].first <= bound:
                active.append(_Cursor(pending.popleft()))
        active = [c for c in active if not c.done]


def _ordered(pieces: list[tuple[pa.Table, np.ndarray]], order: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Sorted pieces, merged. A stable sort of the keys keeps each piece's own order among equal
    keys, which is the full order unless two pieces share a key (one window's rows split across
    runs): then the `order` columns decide."""
    table = pa.concat_tables([t for t, _ in pieces])
    keys = np.concatenate([k for _, k in pieces])
    if len(pieces) == 1:
        return table, keys
    idx = np.argsort(keys, kind="stable")
    source = np.repeat(np.arange(len(pieces)), [len(k) for _, k in pieces])[idx]
    ordered = keys[idx]
    if np.any((ordered[1:] == ordered[:-1]) & (source[1:] != source[:-1])):
        return sort_run(table, keys, order)
    return table.take(pa.array(idx)), ordered


def sort_run(table: pa.Table, keys: np.ndarray, order: list[str]) -> tuple[pa.Table, np.ndarray]:
    """`table` sorted by its keys, then by the columns `order` (doc_index and window_index are in
    the key already)."""
    rest = [c for c in order if c in table.schema.names and c not in ("doc_index", "window_index")]
    if not rest:
        idx = np.argsort(keys, kind="stable")
    else:
        idx = pc.sort_indices(table.append_column(KEY, pa.array(keys)),
                              sort_keys=[(KEY, "ascending")] + [(c, "ascending") for c in rest]).to_numpy()
    return table.take(pa.array(idx)), keys[idx]


def overlap_depth(segments: list[Segment]) -> int:
    """The most segments whose key ranges share one key."""
    events = sorted([(s.first, 0) for s in segments] + [(s.last, 1) for s in segments])
    depth = best = 0
    for _, end in events:
        depth += -1 if end else 1
        best = max(best, depth)
    return best


def bounded(segments: list[Segment], fan_in: int, order: list[str], scratch) -> list[Segment]:
    """`segments`, with groups of them merged into longer runs until at most `fan_in` overlap.
    `scratch()` gives a new SpillFile for each pass."""
    while overlap_depth(segments) > fan_in:
        out = scratch()
        ordered = sorted(segments, key=lambda s: s.first)
        for i in range(0, len(ordered), fan_in):
            for table, keys in merge(ordered[i:i + fan_in], order):
                out.append(table, keys)
            out.end_stream()
        out.close_writer()
        for spill in {id(s.spill): s.spill for s in segments}.values():
            spill.remove()
        segments = out.segments
    return segments


def row_group_rows(band_rows: list[int], est_bytes: float, per_group: int, footer_so_far: int) -> int:
    """Rows per row group for one stretch of a file, chosen to minimise the bytes a one-document
    query reads by pyarrow's access pattern: the file's last 64 KiB (the footer with it, or read
    again whole when longer), then one row group per band. More row groups make each smaller but
    the footer longer by `per_group` bytes each; the footers stay within `FOOTER_SHARE` of the
    data, so a small file is not mostly footer."""
    bands = max(len(band_rows), 1)
    band_bytes = est_bytes / bands

    def cost(n: int) -> float:
        footer = footer_so_far + per_group * n * bands
        return TAIL_READ + (footer if footer + 8 > TAIL_READ else 0) + bands * band_bytes / n

    most = max(1, min(4096, max(band_rows) // 1024, int(FOOTER_SHARE * est_bytes / (bands * per_group))))
    n = min(range(1, most + 1), key=cost)
    return max(1024, math.ceil(max(band_rows) / n))


def band_rows(segments: list[Segment]) -> list[int]:
    """Rows of each band in `segments`."""
    rows: dict[int, int] = {}
    for seg in segments:
        band = seg.first >> _BAND_SHIFT
        rows[band] = rows.get(band, 0) + seg.rows
    return list(rows.values())


def first_batch(segments: list[Segment]) -> pa.Table:
    """The first spilled batch of `segments`, as the buffered columns: a sample for `measure`."""
    seg = segments[0]
    return pa.Table.from_batches([seg.spill.batch(seg.batches[0])]).drop_columns([KEY])


def measure(sample: pa.Table, metadata: dict, options: dict) -> tuple[float, int, int]:
    """(Parquet bytes per row, footer bytes per row group, footer bytes besides) of a file of
    rows like `sample`, written with `options`: the sample encoded in memory as one row group
    and as two."""
    rows = max(sample.num_rows, 2)
    sizes = []
    for groups in (1, 2):
        sink = pa.BufferOutputStream()
        with pq.ParquetWriter(sink, sample.schema, **options) as w:
            w.add_key_value_metadata(metadata)
            w.write_table(sample, row_group_size=-(-rows // groups))
        data = sink.getvalue()
        sizes.append((data.size, pq.ParquetFile(pa.BufferReader(data)).metadata.serialized_size))
    per_group = max(sizes[1][1] - sizes[0][1], 1)
    # a real file's row groups take ~7% more footer than the sample's (longer varints for offsets
    # and counts, measured on per-head topk edges): estimate 10% over
    return (sizes[0][0] - sizes[0][1]) / rows, int(per_group * 1.1), sizes[0][1] - per_group


SLACK = 0.1  # a row group ends at the document boundary nearest its target, within +-10%


def cuts(keys: np.ndarray, target: int, final: bool) -> list[int]:
    """Where row groups end in a sorted stretch of one band that starts a row group: at the
    document boundary nearest the target within +-10% (inside a document when none is), so groups
    are even and a short document lies in one. Unless `final`, only the cuts that rows still to
    come cannot change; when `final`, the rest is shared out evenly, no group far below target."""
    n = len(keys)
    doc = key_doc(keys)
    bounds = np.flatnonzero(doc[1:] != doc[:-1]) + 1
    out, begin = [], 0
    while True:
        size = target
        if final:
            groups = round((n - begin) / target)
            if groups <= 1:
                break
            size = (n - begin) / groups
        lo, ideal, hi = begin + int(size * (1 - SLACK)), begin + int(size), begin + int(size * (1 + SLACK))
        if not final and hi >= n:
            break
        near = bounds[np.searchsorted(bounds, lo):np.searchsorted(bounds, hi, side="right")]
        cut = int(near[np.argmin(np.abs(near - ideal))]) if len(near) else ideal
        out.append(cut)
        begin = cut
    return out


class Grouper:
    """Sealed rows, in merge order, into row groups handed to `write`: one band of heads each,
    cut by `cuts` near `target` rows. Holds at most about two groups' rows."""

    def __init__(self, target: int, write):
        self.target, self.write = target, write
        self.tables: list[pa.Table] = []
        self.keys: list[np.ndarray] = []
        self.rows = 0
        self.band = None

    def add(self, table: pa.Table, keys: np.ndarray) -> None:
        band = key_band(keys)
        starts = np.concatenate([[0], np.flatnonzero(band[1:] != band[:-1]) + 1, [len(keys)]])
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            if band[a] != self.band:
                self.finish()
                self.band = band[a]
            self.tables.append(table.slice(a, b - a))
            self.keys.append(keys[a:b])
            self.rows += b - a
            if self.rows >= 3 * self.target:  # enough for a settled group besides the last one
                self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)
        self.band = None

    def _emit(self, final: bool) -> None:
        """Write the groups that are settled; unless `final`, the last one waits, so that the
        band's rest can be shared out evenly with it at the end."""
        if not self.tables:
            return
        table, keys = pa.concat_tables(self.tables), np.concatenate(self.keys)
        ends = cuts(keys, self.target, final)
        ends = ends + [len(keys)] if final else ends[:-1]
        start = 0
        for end in ends:
            self.write(table.slice(start, end - start))
            start = end
        self.tables, self.keys = ([table.slice(start)], [keys[start:]]) if start < len(keys) else ([], [])
        self.rows = len(keys) - start
