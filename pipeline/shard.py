"""The step: one shard of the corpus in, its committed Parquet files out.

`run_shard(job, shard, runtime, out)` (shard: a `ShardSpec`, its corpus rows) knows nothing about processes or executors: the local
executor calls it in a loop, a Dask worker will call the same function. It writes the shard's
files through the streaming writer, publishes them and writes the shard's completion record,
and returns a typed `ShardResult`.

Memory stays bounded whatever the shard: documents are walked in doc_id order in small chunks,
each chunk tokenized on its own, its windows cut into units of a few batches, and rows streamed
to the writer as each batch comes back from the model.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from . import faults
from .corpus import ShardDocs
from .job import JobSpec
from .recipes import RECIPES, recipe_params
from .reduce import Output, reduce_batch
from .runtime import Runtime
from .store import commit as store_commit
from .store import paths
from .store.location import Location, as_location
from .store.plan import ShardSpec
from .store.writer import FileInfo, ShardWriter
from .windows import Window, make_batches, tokenize

# progress(documents_finished, tokens_processed, characters_processed)
Progress = Callable[[int, int, int], None]

CHUNK_DOCS = 256  # documents tokenized together
CHUNK_CHARS = 1 << 18  # ... or fewer, when they are long
UNIT_BATCHES = 4  # windows are reduced in units of about this many batches


@dataclass
class ShardResult:
    shard: int
    attempt: str
    documents: int
    empty_documents: int
    repeated_texts: int
    windows: int
    tokens: int
    rows: dict[str, int]
    files: list[FileInfo] = field(default_factory=list)
    seconds: float = 0.0
    inputs: str = ""  # fingerprint of the shard's documents
    corpus_rows: tuple[int, int] = (0, 0)  # [start, stop) of the corpus rows it covers


def doc_chunks(docs: ShardDocs) -> Iterator[slice]:
    """Consecutive slices of the shard's (doc_id-sorted) documents."""
    start = 0
    while start < len(docs.rows):
        stop, chars = start, 0
        while stop < len(docs.rows) and stop - start < CHUNK_DOCS and (chars < CHUNK_CHARS or stop == start):
            chars += int(docs.chars[stop])
            stop += 1
        yield slice(start, stop)
        start = stop


def work_units(windows: list[Window], tokens: int) -> Iterator[list[Window]]:
    """Runs of consecutive windows of at most `tokens` tokens (one window may exceed it)."""
    unit: list[Window] = []
    size = 0
    for w in windows:
        if unit and size + len(w) > tokens:
            yield unit
            unit, size = [], 0
        unit.append(w)
        size += len(w)
    if unit:
        yield unit


def document_columns(docs: ShardDocs, part: slice, windows: list[Window], texts: list[str],
                     stride: int) -> dict:
    n = len(texts)
    count = np.zeros(n, dtype=np.int32)
    content = np.zeros(n, dtype=np.int64)
    for w in windows:
        # Windows after the first repeat `stride` content tokens of the one before.
        content[w.doc_index] += sum(not s for s in w.special) - (stride if w.window else 0)
        count[w.doc_index] += 1
    return {"doc_id": docs.doc_ids[part], "corpus_row": docs.rows[part], "shard": np.full(n, docs.shard, np.int32),
            "content_tokens": content, "windows": count, "text_sha1": docs.text_sha1[part],
            "occurrence": docs.occurrence[part], "empty": [not t.strip() for t in texts]}


def token_columns(doc_ids: list[str], windows: list[Window], tokenizer) -> dict:
    cols: dict[str, list] = {k: [] for k in ("doc_id", "window_index", "position", "token_id", "token",
                                             "char_start", "char_end", "special")}
    for w in windows:
        n = len(w)
        cols["doc_id"] += [doc_ids[w.doc_index]] * n
        cols["window_index"] += [w.window] * n
        cols["position"] += range(n)
        cols["token_id"] += w.input_ids
        cols["token"] += tokenizer.convert_ids_to_tokens(w.input_ids)
        cols["char_start"] += [s for s, _ in w.offsets]
        cols["char_end"] += [e for _, e in w.offsets]
        cols["special"] += w.special
    return cols


def output_columns(out: Output, spec: dict, doc_ids: pa.Array, window_ids: np.ndarray) -> dict:
    """Recipe columns -> table columns: batch_index becomes doc_id and window_index."""
    cols = dict(out.columns)
    index = cols.pop("batch_index")
    if "weights.values" in cols:  # dense: flat values + row lengths -> list column
        offsets = np.concatenate([[0], np.cumsum(cols.pop("weights.lengths"))]).astype(np.int32)
        cols["weights"] = pa.ListArray.from_arrays(offsets, cols.pop("weights.values"))
    rows = len(index)
    return {"doc_id": doc_ids.take(pa.array(index)), "window_index": window_ids[index], **cols,
            "recipe": _repeat(spec["name"], rows), "recipe_params": _repeat(recipe_params(spec), rows)}


def _repeat(value: str, rows: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(np.zeros(rows, dtype=np.int32), pa.array([value])).cast(pa.string())


def _write_unit(writer: ShardWriter, rt: Runtime, unit: list[Window], doc_ids: list[str]) -> None:
    job = rt.job
    for batch in make_batches(unit, job.run.batch_tokens):
        chosen = [unit[i] for i in batch]
        ids = pa.array([doc_ids[w.doc_index] for w in chosen], pa.string())
        window_ids = np.array([w.window for w in chosen], dtype=np.int32)
        for output in reduce_batch(rt.model, chosen, job.recipes):
            spec = job.recipes[output.recipe]
            writer.write_batch(RECIPES[spec["name"]].table, output_columns(output, spec, ids, window_ids),
                               layer=output.layer, recipe=output.recipe)
        faults.point("batch")


def run_shard(job: JobSpec, spec: ShardSpec, rt: Runtime, out: Location | Path | str,
              progress: Progress | None = None) -> ShardResult:
    """Process, write and commit one shard. Leaves nothing visible unless it commits."""
    started = time.perf_counter()
    loc = as_location(out)
    faults.shard_start(spec.index)
    docs = rt.corpus.shard(spec.index, spec.start, spec.stop)
    attempt = paths.new_attempt()
    staging_root, temporary = loc.staging_root()
    try:
        with ShardWriter(staging_root, spec.index, attempt, rt.provenance, weight_dtype=job.run.weight_dtype,
                         buffer_bytes=job.run.buffer_mb << 20) as writer:
            writer.recipes = {i: (r["name"], recipe_params(r)) for i, r in enumerate(job.recipes)}
            counts = _write_documents(writer, rt, docs, progress)
            files = writer.finalize()
            rows = {}
            for f in files:
                rows[f.table] = rows.get(f.table, 0) + f.rows
            result = ShardResult(spec.index, attempt, len(docs.rows), counts["empty"],
                                 int((docs.occurrence > 1).sum()), counts["windows"], counts["tokens"], rows,
                                 files, 0.0, docs.fingerprint, (spec.start, spec.stop))
            try:
                store_commit.publish(loc, writer.staging, files)
                result.seconds = round(time.perf_counter() - started, 3)
                store_commit.commit(loc, spec.index, attempt, files, record_info(rt, result))
            except BaseException:
                store_commit.unpublish(loc, spec.index, attempt, files)  # a failed attempt leaves no data files
                raise
    finally:
        if temporary:
            shutil.rmtree(staging_root, ignore_errors=True)
    faults.point("commit")
    return result


def _write_documents(writer: ShardWriter, rt: Runtime, docs: ShardDocs, progress: Progress | None) -> dict:
    """Every document of the shard, chunk by chunk, through the model and into the writer."""
    job, tok = rt.job, rt.model.tokenizer
    counts = {"tokens": 0, "windows": 0, "empty": 0}
    for part in doc_chunks(docs):
        rows = docs.rows[part]
        texts = rt.corpus.texts(rows)
        windows = tokenize(tok, texts, rt.window_length, job.model.stride)
        writer.write_batch("documents", {**document_columns(docs, part, windows, texts, job.model.stride),
                                         **rt.corpus.metadata(rows)}, extra=rt.corpus.metadata_schema())
        doc_ids = docs.doc_ids[part]
        writer.write_batch("tokens", token_columns(doc_ids, windows, tok))
        remaining = np.bincount([w.doc_index for w in windows], minlength=len(texts))
        share = docs.chars[part] / np.maximum(remaining, 1)  # characters per window, for the ETA
        counts["empty"] += int((remaining == 0).sum())
        if progress:
            progress(int((remaining == 0).sum()), 0, int(docs.chars[part][remaining == 0].sum()))
        for unit in work_units(windows, UNIT_BATCHES * job.run.batch_tokens):
            _write_unit(writer, rt, unit, doc_ids)
            done = np.bincount([w.doc_index for w in unit], minlength=len(texts))
            remaining -= done
            if progress:
                progress(int(((done > 0) & (remaining == 0)).sum()), sum(len(w) for w in unit),
                         int((share * done).sum()))
        counts["tokens"] += sum(len(w) for w in windows)
        counts["windows"] += len(windows)
    return counts


def record_info(rt: Runtime, r: ShardResult) -> dict:
    """What a completion record says besides its files."""
    return {"job_fingerprint": rt.job.fingerprint(), "inputs": r.inputs, "corpus_rows": list(r.corpus_rows),
            "weights": rt.weights_id,
            "documents": r.documents, "empty_documents": r.empty_documents,
            "repeated_texts": r.repeated_texts, "windows": r.windows, "tokens": r.tokens,
            "rows": r.rows, "seconds": r.seconds, "provenance": rt.provenance}
