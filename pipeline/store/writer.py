"""The streaming shard writer: rows go to Parquet as they are produced.

One open `pq.ParquetWriter` per (table, site, layer, recipe) in the attempt's staging folder, opened
when its first rows arrive. Rows wait in a small buffer; a full buffer is sorted, then written (or
kept as a sorted run, below), and a file is closed and a new part begun once it passes
`max_file_bytes` (a closed file is always readable). Peak memory is the batch plus
`buffer_bytes`, whatever the size of the shard or of one document.

Two things keep the sort cheap. A producer may hand `doc_index` (int32, positions in the shard's
sorted `doc_ids`) in place of the `doc_id` strings: rows are sorted on the integers and the
strings are made once, after the sort. Columns that are the same on every row of a file
(`recipe`, `recipe_params`, the site's `stack` and `attention`) are never buffered: they are added at write time from one cached
array, as zero-copy slices.

Rows given with `doc_index` (the model's outputs) are not written at flush: each flush is a
sorted run spilled to disk, and `seal(upto)` (the step calls it once the documents before `upto`
are complete, beside the model on an accelerator; the CPU path calls `seal_now` once the runs
pass a size, on every core while its model waits; `finalize` seals the rest) merges the runs and
writes row groups that each hold one band of heads (`runs.HEAD_BANDS` per layer) and a contiguous
range of documents, sized by a model of what a one-document query reads (`runs.row_group_rows`).
So both a filter on one (layer, head) and one on one document skip most of a file (measured by
benchmarks/bench_storage.py). Rows given with `doc_id` strings (documents, tokens, words) arrive
in doc_id order and are written at flush, sorted inside it, in row groups of at most 16k rows that
never mix values of `row_group_by`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, asdict
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import paths, runs
from .location import fsync_path
from .schema import table_schema

# Encodings chosen by measurement on the demo corpus (benchmarks/bench_storage.py): dictionary
# encoding (the default) beats delta for query_pos and key_pos (0.50 vs 0.65 bytes per edge) and
# makes the repeated strings (doc_id, recipe, recipe_params) nearly free; character offsets grow
# along a window, so they delta-encode; zstd levels above 3 gained nothing on float16 weights.
DELTA_COLUMNS = ("char_start", "char_end")
DEFAULT_SITE = ("encoder", "self")  # of layered rows written without a site
ZSTD_LEVEL = 3
# Runs of one stretch go to disk raw (fastest) up to this many bytes per table file, compressed
# beyond: the temporary disk of one 1 MB document's per-head edges is ~0.9 GB instead of ~4.5 GB.
SPILL_RAW_BYTES = 256 << 20


def round_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) to bfloat16's 8 significant bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32)


@dataclass
class FileInfo:
    """One committed file, as its completion record lists it."""

    path: str  # relative to the output directory
    table: str
    layer: int | None
    recipe: int | None
    rows: int
    bytes: int
    sha256: str
    site: str | None = None  # "decoder-cross", ...: the site folder of encoder-decoder runs

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_of(source) -> str:
    """sha256 of a file, given its path or an open binary file."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            return sha256_of(fh)
    digest = hashlib.sha256()
    for chunk in iter(lambda: source.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()


class _TableWriter:
    """Buffered rows of one (table, site, layer, recipe) and its current Parquet file."""

    def __init__(self, owner: "ShardWriter", table: str, layer: int | None, recipe: int | None,
                 site: tuple[str, str] | None = None):
        self.owner, self.table, self.layer, self.recipe = owner, table, layer, recipe
        self.site = site  # (stack, attention) of a layered table's rows
        self.declared = table_schema(table)
        self.buffer: list[pa.Table] = []
        self.buffered_rows = self.buffered_bytes = 0
        self.part = 0
        self.writer: pq.ParquetWriter | None = None
        self.rel: Path | None = None
        self.rows_in_file = self.groups_in_file = 0
        self.files: list[FileInfo] = []
        self.spill: runs.SpillFile | None = None  # sorted runs of rows given with doc_index
        self.spilled: list[runs.SpillFile] = []  # earlier files of the same stretch
        self.merged = False  # rows went through sorted runs: the file is written by seals
        self.row_bytes = 64  # bytes per buffered row (Arrow), updated at each flush

    @cached_property
    def schema(self) -> pa.Schema:  # the file's schema, without its metadata
        return self.owner.schema(self.table, self.recipe).remove_metadata()

    @cached_property
    def constants(self) -> dict[str, str]:
        """Columns with one value in the whole file: the recipe's name and parameters, and the
        site (stack, attention) of a layered table."""
        values = {}
        if self.recipe in self.owner.recipes:
            name, params = self.owner.recipes[self.recipe]
            values = {"recipe": name, "recipe_params": params,
                      "recipe_label": paths.recipe_label(name, json.loads(params))}
        if self.declared.layer_folders:
            values["stack"], values["attention"] = self.site or DEFAULT_SITE
        return {c: v for c, v in values.items() if c in self.schema.names}

    def buffer_schema(self, names) -> pa.Schema:
        """The buffered rows' schema: the columns the producer gives, `doc_index` as int32."""
        fields = []
        for name in names:
            if name == "doc_index":
                fields.append(pa.field("doc_index", pa.int32(), nullable=False))
            elif name in self.constants:
                raise ValueError(f"{self.table}: column {name} is filled by the writer")
            else:
                fields.append(self.schema.field(name))
        return pa.schema(fields)

    def add(self, data: pa.Table) -> None:
        self.buffer.append(data)
        self.buffered_rows += data.num_rows
        self.buffered_bytes += data.nbytes

    @cached_property
    def order(self) -> list[str]:
        """The columns rows are sorted by, `doc_index` standing for doc_id."""
        return ["doc_index" if c == "doc_id" else c for c in self.declared.sort_by]

    def flush(self) -> None:
        if not self.buffered_rows:
            return
        data = pa.concat_tables(self.buffer)
        self.row_bytes = max(1, data.nbytes // max(data.num_rows, 1))
        self.buffer, self.buffered_rows, self.buffered_bytes = [], 0, 0
        if "doc_index" in data.column_names:
            self._spill_run(data)
            return
        keys = [c for c in self.declared.row_group_by + self.declared.sort_by if c in data.column_names]
        data = self._complete(data.take(pc.sort_indices(data, sort_keys=[(k, "ascending") for k in keys])))
        writer = self._open(data.schema)
        for piece in self._row_groups(data):
            writer.write_table(piece, row_group_size=self.owner.row_group_rows)
        self._written(data.num_rows)

    def _written(self, rows: int, groups: int = 0) -> None:
        self.rows_in_file += rows
        self.groups_in_file += groups
        if self.owner.staging.joinpath(self.rel).stat().st_size >= self.owner.max_file_bytes:
            self.close()

    # ---- rows given with doc_index: sorted runs on disk, merged into row groups at seal

    def _new_spill(self, compress: bool = False) -> runs.SpillFile:
        self.merged = True
        number = next(self.owner.spill_numbers)  # seal threads make spills too: one shared counter
        name = f"{self.table}-{self.site_folder or ''}-{self.layer}-{self.recipe}-{number}.arrow"
        return runs.SpillFile(self.owner.staging / "_runs" / name, self.spill_schema, self.owner.in_memory, compress)

    def _spill_run(self, data: pa.Table) -> None:
        self.spill_schema = data.schema
        if self.spill is not None and self.spill.disk_bytes >= SPILL_RAW_BYTES:
            # a long stretch (one very long document, many long ones): the rest goes compressed
            self.spill.close_writer()
            self.spilled.append(self.spill)
            self.spill = self._new_spill(compress=True)
        if self.spill is None:
            self.spill = self._new_spill()
        self.spill.add_run(*runs.sort_run(data, runs.sort_keys(data, self.owner.heads), self.order))

    def start_seal(self, upto: int):
        """Detach the runs spilled so far (later flushes start new ones) and return the work that
        writes every row of a document before `upto` (a doc_index) as row groups, for another
        thread; None when there is nothing to seal."""
        if self.buffer and "doc_index" in self.buffer[0].column_names:
            self.flush()
        spills = self.spilled + ([self.spill] if self.spill is not None else [])
        self.spill, self.spilled = None, []
        if not any(spill.segments for spill in spills):
            return None
        return lambda: self._seal(spills, upto)

    def _seal(self, spills: list[runs.SpillFile], upto: int) -> None:
        """Merge `spills` into row groups; the rows of documents not complete yet go back, as one
        sorted run, to be sealed next time."""
        for spill in spills:
            spill.close_writer()
        budget = self.owner.buffer_bytes // 4
        fan_in = max(4, budget // (2 * runs.BATCH_ROWS * self.row_bytes))  # two batches per open run
        segments = runs.bounded([seg for spill in spills for seg in spill.segments], fan_in,
                                self.order, self._new_spill)
        sample = self._complete(runs.first_batch(segments))
        meta = self.owner.schema(self.table, self.recipe).metadata
        per_row, per_group, footer = runs.measure(sample, meta, self._parquet_options(self.schema))
        bands = runs.band_rows(segments)
        target = runs.row_group_rows(bands, per_row * sum(bands), per_group, footer + per_group * self.groups_in_file)
        groups = runs.Grouper(target, self._group)
        carry = None
        for table, keys in runs.merge(segments, self.order):
            below = runs.key_doc(keys) < upto
            if below.all():
                groups.add(table, keys)
                continue
            if below.any():
                groups.add(table.filter(pa.array(below)), keys[below])
            carry = carry or self._new_spill()
            carry.append(table.filter(pa.array(~below)), keys[~below])
        groups.finish()
        if carry is not None:
            carry.close_writer()
            self.spilled.append(carry)
        for spill in {id(s): s for s in spills + [seg.spill for seg in segments]}.values():
            spill.remove()

    def _group(self, rows: pa.Table) -> None:
        """One row group of sealed rows."""
        data = self._complete(rows)
        self._open(data.schema).write_table(data, row_group_size=max(data.num_rows, 1))
        self._written(data.num_rows, groups=1)

    def _complete(self, data: pa.Table) -> pa.Table:
        """Sorted buffered rows -> the file's columns: doc_id from doc_index, the constants, and
        null for a value column the producer left out (a statistic cross-attention has not).
        doc_id and the constants come dictionary-encoded (_repeated, _doc_ids): the Parquet
        writer takes a dictionary array's indices as they are, where it would hash plain strings
        row by row (a third of the encoding time of the default recipes' files). The files hold
        no Arrow schema (store_schema=False), so readers see strings, as before."""
        columns = []
        for name in self.schema.names:
            if name in self.constants:
                columns.append(_repeated(self.constants[name], data.num_rows))
            elif name == "doc_id" and "doc_index" in data.column_names:
                columns.append(_doc_ids(self.owner.doc_ids, data.column("doc_index")))
            elif name not in data.column_names and name in self.declared.optional_columns:
                # not defined here: cross rows' relative statistics, generate runs' columns elsewhere
                columns.append(pa.nulls(data.num_rows, self.schema.field(name).type))
            else:
                columns.append(data.column(name))
        fields = [f if f.type == c.type else f.with_type(c.type) for f, c in zip(self.schema, columns)]
        return pa.Table.from_arrays(columns, schema=pa.schema(fields, self.schema.metadata))

    def _row_groups(self, data: pa.Table):
        """Slices of sorted `data`, one per value of the row_group_by columns."""
        if not self.declared.row_group_by or data.num_rows == 0:
            yield data
            return
        key = data.column(self.declared.row_group_by[0]).to_numpy()
        starts = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
        for start, stop in zip(starts, np.append(starts[1:], len(key))):
            yield data.slice(int(start), int(stop - start))

    def _open(self, schema: pa.Schema) -> pq.ParquetWriter:
        """The file's writer, opened for tables of `schema` (what _complete makes: the table's
        schema, doc_id and the constants dictionary-encoded)."""
        if self.writer is None:
            o = self.owner
            self.rel = paths.data_file(self.table, o.shard, o.attempt, self.layer, self.recipe, self.part,
                                       self.site_folder)
            target = o.staging / self.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            meta = o.schema(self.table, self.recipe).metadata
            self.writer = pq.ParquetWriter(target, schema.with_metadata(meta), **self._parquet_options(schema))
            # Without store_schema, pyarrow drops the schema's metadata: write it to the footer.
            self.writer.add_key_value_metadata(meta)
            self.rows_in_file = self.groups_in_file = 0
        return self.writer

    def _parquet_options(self, schema: pa.Schema) -> dict:
        encoding = {c: "DELTA_BINARY_PACKED" for c in DELTA_COLUMNS if c in schema.names}
        if self.owner.weight_dtype == "bfloat16":  # the zero low bytes of each value fall into streams of their own
            encoding.update({c: "BYTE_STREAM_SPLIT" for c in self.declared.value_columns
                             if pa.types.is_float32(schema.field(c).type)})
        return dict(compression="zstd", compression_level=ZSTD_LEVEL,
                    use_dictionary=[c for c in schema.names if c not in encoding],
                    column_encoding=encoding, write_statistics=self._statistics(schema), store_schema=False,
                    write_page_checksum=True)  # CRC32 per page: readers that verify them catch bit flips

    def _statistics(self, schema: pa.Schema) -> bool | list[str]:
        """Columns with min/max statistics. Files merged from runs keep them only where a row group
        can be told from the others (doc_id, layer, head, the columns constant in the file):
        positions, windows, steps and values span nearly their whole range in every row group,
        and each statistic lengthens the footer every query reads."""
        if not self.merged:
            return True
        return [c for c in schema.names if c in ("doc_id", "layer", "head") or c in self.constants]

    @property
    def site_folder(self) -> str | None:
        if not (self.owner.site_folders and self.declared.layer_folders):
            return None
        return paths.site_folder(*(self.site or DEFAULT_SITE))

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        target = self.owner.staging / self.rel
        fsync_path(target)
        self.files.append(FileInfo(str(self.rel), self.table, self.layer, self.recipe, self.rows_in_file,
                                   target.stat().st_size, sha256_of(target), self.site_folder))
        self.part += 1
        self.groups_in_file = 0


class ShardWriter:
    """Context manager for one attempt at one shard: `write_batch(...)` any number of times, then
    `finalize()` -> the files, complete and fsynced, still in staging. Leaving the block with an
    error deletes the attempt's staging folder; nothing of it was ever visible."""

    def __init__(self, staging_root: Path, shard: int, attempt: str, provenance: dict, *,
                 weight_dtype: str = "bfloat16", buffer_bytes: int = 64 << 20,
                 flush_rows: int = 1 << 17, row_group_rows: int = 1 << 14,
                 max_file_bytes: int = 256 << 20, site_folders: bool = False, heads: int | None = None):
        self.shard, self.attempt = shard, attempt
        self.heads = heads  # the model's heads per layer: row groups hold bands of them (store/runs.py)
        self.in_memory = runs.Budget(buffer_bytes // 16)  # runs kept in memory before they go to disk
        self.spill_numbers = itertools.count(1)
        # Seals run beside the model on one thread (pyarrow's encoding releases the GIL): an
        # accelerator's step never waits for a stretch's Parquet (the CPU path uses seal_now). Two
        # threads were measured slower on 2 cores (more CPU in all: torch's threads, the writer's
        # and two sealers contend) and took more memory.
        self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnpipe-seal")
        self._sealing: list[Future] = []
        # Encoder-decoder runs write three sites with the same layer numbers: a folder per site.
        self.site_folders = site_folders
        self.staging = paths.staging_dir(Path(staging_root), shard, attempt)
        self.provenance = json.dumps(provenance, sort_keys=True, default=str)
        self.weight_dtype = weight_dtype
        self.buffer_bytes, self.flush_rows = buffer_bytes, flush_rows
        self.row_group_rows, self.max_file_bytes = row_group_rows, max_file_bytes
        self.writers: dict[tuple, _TableWriter] = {}
        self.extra: dict[str, pa.Schema] = {}
        self.recipes: dict[int, tuple[str, str]] = {}  # recipe index -> (name, params): metadata, columns
        self._doc_ids: pa.Array | None = None
        self.files: list[FileInfo] = []

    def __enter__(self) -> "ShardWriter":
        self.staging.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._sealer.shutdown(wait=True, cancel_futures=True)
        for w in self.writers.values():
            if w.writer is not None:
                try:
                    w.writer.close()
                except Exception:  # the disk may be full; the folder goes anyway
                    pass
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.staging.parent.rmdir()  # only when no other attempt is staging beside this one
        except OSError:
            pass

    def schema(self, table: str, recipe: int | None = None) -> pa.Schema:
        declared = table_schema(table)
        schema = declared.arrow(self.weight_dtype)
        for field in self.extra.get(table, []):
            schema = schema.append(field)
        meta = {"attnpipe.table": table, "attnpipe.schema_version": str(declared.version),
                "attnpipe.provenance": self.provenance}
        if recipe in self.recipes:  # every row of the file comes from this one recipe
            name, params = self.recipes[recipe]
            meta["attnpipe.recipe"], meta["attnpipe.recipe_params"] = name, params
            meta["attnpipe.recipe_label"] = paths.recipe_label(name, json.loads(params))
        return schema.with_metadata(meta)

    @property
    def doc_ids(self) -> pa.Array:
        """The shard's doc_ids, sorted: what a `doc_index` column points into."""
        if self._doc_ids is None:
            raise ValueError("rows with doc_index need the shard's doc_ids (ShardWriter.doc_ids = ...)")
        return self._doc_ids

    @doc_ids.setter
    def doc_ids(self, ids) -> None:
        ids = pa.array(ids, pa.string())
        if len(ids) > 1 and not pc.all(pc.less(ids[:-1], ids[1:])).as_py():
            raise ValueError("ShardWriter.doc_ids must be unique and sorted")
        self._doc_ids = ids

    def write_batch(self, table: str, columns: dict, layer: int | None = None,
                    recipe: int | None = None, extra: pa.Schema | None = None,
                    site: tuple[str, str] | None = None) -> None:
        """Add rows of `table`; `extra` declares passthrough columns beyond its schema. A recipe
        table's `recipe` and `recipe_params` columns come from `recipes`, a layered table's
        `stack` and `attention` from `site` (default encoder, self); `doc_index` may stand for
        `doc_id` (see the module's docstring)."""
        if extra is not None:
            self.extra[table] = extra
        if layer is not None:
            columns = {**columns, "layer": np.full(_rows(columns), layer, dtype=np.int16)}
        if self.weight_dtype == "bfloat16":
            columns = {k: _round_values(v) if k in table_schema(table).value_columns else v
                       for k, v in columns.items()}
        key = (table, site, layer, recipe)
        if key not in self.writers:
            self.writers[key] = _TableWriter(self, table, layer, recipe, site)
        writer = self.writers[key]
        writer.add(pa.Table.from_pydict(columns, schema=writer.buffer_schema(columns)))
        if writer.buffered_rows >= self.flush_rows:
            writer.flush()
        self._bound_memory()

    def _bound_memory(self) -> None:
        """Flush the largest buffers until all of them together fit half of `buffer_bytes` (the
        rest is the seal's: a quarter for its merge, a sixteenth for runs kept in memory)."""
        total = sum(w.buffered_bytes for w in self.writers.values())
        for w in sorted(self.writers.values(), key=lambda w: -w.buffered_bytes):
            if total <= self.buffer_bytes // 2:
                break
            total -= w.buffered_bytes
            w.flush()

    def seal(self, upto: int) -> None:
        """Every document before doc_index `upto` is complete: its rows become row groups, on the
        seal threads, once the previous seal is done."""
        self.wait_sealed()
        for w in list(self.writers.values()):
            if (work := w.start_seal(upto)) is not None:
                self._sealing.append(self._sealer.submit(work))

    def seal_now(self, upto: int) -> None:
        """`seal(upto)` on as many threads as there are cores (up to 4), returning when it is done:
        for when nothing else needs the cores (the last stretch; the CPU path, whose model would
        otherwise share its cores with the seal, shard.py)."""
        self.wait_sealed()
        pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="attnpipe-seal")
        try:
            futures = [pool.submit(work) for w in list(self.writers.values())
                       if (work := w.start_seal(upto)) is not None]
            for future in futures:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def runs_bytes(self) -> int:
        """Arrow bytes of the rows waiting for a seal (sorted runs, and rows given with doc_index
        still in a buffer), all tables together. Read while the writer thread writes: a recent
        figure, not an exact one."""
        total = 0
        for w in list(self.writers.values()):
            buffer = list(w.buffer)
            if buffer and "doc_index" in buffer[0].column_names:
                total += sum(t.nbytes for t in buffer)
            total += sum(spill.stored_bytes for spill in list(w.spilled) + [w.spill] if spill is not None)
        return total

    def wait_sealed(self) -> None:
        """Wait for the seal under way; its error, if any, is raised here."""
        sealing, self._sealing = self._sealing, []
        for future in sealing:
            future.result()

    def finalize(self) -> list[FileInfo]:
        """Flush and close every file; they are complete and fsynced, still in staging."""
        for w in self.writers.values():
            w.flush()
        self.seal_now(1 << 31)  # the last stretch: the model is done
        self._sealer.shutdown()
        for w in self.writers.values():
            w.close()
        shutil.rmtree(self.staging / "_runs", ignore_errors=True)
        self.files = sorted((f for w in self.writers.values() for f in w.files), key=lambda f: f.path)
        return self.files


_ZEROS = np.zeros(1 << 20, np.int32)  # read only: the indices of _repeated's one-entry dictionaries
_ZEROS.flags.writeable = False


def _repeated(value: str, rows: int) -> pa.DictionaryArray:
    """`value` on `rows` rows: a one-entry dictionary, its indices zero-copy zeros (valid by
    construction: not checked, which took a pass over them per column and row group)."""
    zeros = _ZEROS[:rows] if rows <= len(_ZEROS) else np.zeros(rows, np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(zeros), pa.array([value], pa.string()), safe=False)


def _doc_ids(doc_ids: pa.Array, doc_index: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    """doc_id for rows given as indices into the shard's sorted doc_ids, dictionary-encoded with
    only the documents these rows hold (a row group's dictionary page lists its own documents).
    A sealed row group's rows come in document order: its documents and each row's place among
    them in one pass, no sort (np.unique otherwise)."""
    index = doc_index.to_numpy()
    if len(index) and bool((index[1:] >= index[:-1]).all()):
        change = index[1:] != index[:-1]
        used = index[np.concatenate([[True], change])]
        local = np.concatenate([[0], np.cumsum(change, dtype=np.int32)])
    else:
        used, local = np.unique(index, return_inverse=True)
    if len(used) and (used[0] < 0 or used[-1] >= len(doc_ids)):
        raise ValueError(f"doc_index {used[0] if used[0] < 0 else used[-1]} outside the shard's "
                         f"{len(doc_ids)} documents")
    return pa.DictionaryArray.from_arrays(pa.array(local.astype(np.int32, copy=False)),
                                          doc_ids.take(pa.array(used)), safe=False)


def _round_values(column):
    if isinstance(column, pa.ListArray):
        return pa.ListArray.from_arrays(column.offsets, round_bfloat16(column.values.to_numpy(zero_copy_only=False)))
    return round_bfloat16(np.asarray(column))


def _rows(columns: dict) -> int:
    first = next(iter(columns.values()))
    return len(first)
