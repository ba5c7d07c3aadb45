"""The step: one shard of the corpus in, its committed Parquet files out.

`run_shard(job, shard, runtime, out)` (shard: a `ShardSpec`, its corpus rows) knows nothing about processes or executors: the local
executor calls it in a loop, a Dask worker will call the same function. It writes the shard's
files through the streaming writer, publishes them and writes the shard's completion record,
and returns a typed `ShardResult`.

Memory stays bounded whatever the shard: documents are walked in doc_id order in small chunks,
each chunk tokenized on its own, its windows pooled with the short remainder of the chunk before
and cut into length-sorted batches, and rows streamed to the writer as each batch comes back from
the model.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from . import faults
from .corpus import ShardDocs
from .job import JobSpec
from .recipes import RECIPES, recipe_params
from .errors import ModelError
from .reduce import Output, PendingBatch, reduce_batch_async
from .runtime import Runtime
from .store import commit as store_commit
from .store import paths
from .store.location import Location, as_location
from .store.plan import ShardSpec
from .store.writer import FileInfo, ShardWriter
from .pairs import tokenize_pairs
from .windows import Window, make_batches, tokenize
from .wordpieces import word_spans

log = logging.getLogger("attnpipe")

# progress(documents_finished, tokens_processed, characters_processed)
Progress = Callable[[int, int, int], None]

CHUNK_DOCS = 2048  # documents tokenized together
CHUNK_CHARS = 1 << 18  # ... or fewer, when they are long
# The CPU path seals the sorted runs when they pass this many bytes (Arrow, on disk beyond the
# writer's memory budget), not after every chunk: bounds the staging folder's temporary disk.
CPU_SEAL_BYTES = 512 << 20
UNIT_BATCHES = 4  # the window pool is cut into batches once it holds this many batches' worth


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


class WindowPool:
    """Windows waiting for the model, across chunk boundaries.

    Each chunk's windows join the pool; once it holds a few batches' worth, the windows of its
    last documents (about one batch of tokens) wait for the next chunk's windows, so that chunk
    boundaries cost few part-filled batches, and the rest is cut into length-sorted batches for
    the model. Holding the *last* documents (not, say, the shortest windows) leaves every earlier
    document complete, so the writer can seal them (store/runs.py): while the next chunk runs on an
    accelerator, in larger stretches on the CPU path (_write_documents).
    Holds at most a chunk's windows plus one batch (or one long document).
    """

    def __init__(self, batch_tokens: int):
        self.batch_tokens = batch_tokens
        self.waiting: list[tuple[int, Window]] = []  # (document index within the shard, window)
        self.tokens = 0

    def add(self, first_doc: int, windows: list[Window]) -> None:
        self.waiting += [(first_doc + w.doc_index, w) for w in windows]
        self.tokens += sum(len(w) for w in windows)

    def batches(self, final: bool = False) -> list[list[tuple[int, Window]]]:
        """The batches ready for the model (every one when `final`)."""
        if not self.waiting or (not final and self.tokens < UNIT_BATCHES * self.batch_tokens):
            return []
        held: list[tuple[int, Window]] = []
        if not final:
            last, tokens = max(doc for doc, _ in self.waiting), 0
            per_doc: dict[int, int] = {}
            for doc, w in self.waiting:
                per_doc[doc] = per_doc.get(doc, 0) + len(w)
            for doc in sorted(per_doc, reverse=True):  # whole documents, from the last
                tokens += per_doc[doc]
                last = doc
                if tokens >= self.batch_tokens:
                    break
            held = [(doc, w) for doc, w in self.waiting if doc >= last]
            self.waiting = [(doc, w) for doc, w in self.waiting if doc < last]
        batches = [[self.waiting[i] for i in b]
                   for b in make_batches([w for _, w in self.waiting], self.batch_tokens)]
        self.waiting = held
        self.tokens = sum(len(w) for _, w in self.waiting)
        return batches


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
    cols: dict[str, list] = {k: [] for k in ("doc_id", "window_index", "side", "position", "token_id", "token",
                                             "char_start", "char_end", "special", "word_index")}
    for w in windows:
        _sequence_tokens(cols, doc_ids[w.doc_index], w.window, "source", w, tokenizer)
        if w.target is not None:  # a pair's target: the decoder's input tokens, offsets into the target text
            _sequence_tokens(cols, doc_ids[w.doc_index], 0, "target", w.target, tokenizer)
    return cols


def _sequence_tokens(cols: dict, doc_id: str, window: int, side: str, seq, tokenizer) -> None:
    """The rows of one tokenized sequence (a window, or a pair's target) into `cols`."""
    n = len(seq.input_ids)
    cols["doc_id"] += [doc_id] * n
    cols["window_index"] += [window] * n
    cols["side"] += [side] * n
    cols["position"] += range(n)
    cols["token_id"] += seq.input_ids
    cols["token"] += tokenizer.convert_ids_to_tokens(seq.input_ids)
    cols["char_start"] += [s for s, _ in seq.offsets]
    cols["char_end"] += [e for _, e in seq.offsets]
    cols["special"] += seq.special
    cols["word_index"] += seq.words


def word_columns(doc_ids: list[str], windows: list[Window], texts: list[str],
                 targets: list[str] | None) -> dict:
    """The `words` table: each window's (and target's) words, their text and spans."""
    cols: dict[str, list] = {k: [] for k in ("doc_id", "window_index", "side", "word_index", "text", "char_start",
                                             "char_end", "first_position", "last_position", "special")}
    for w in windows:
        sides = [("source", w, texts[w.doc_index])]
        if w.target is not None:
            sides.append(("target", w.target, targets[w.doc_index]))
        for side, seq, text in sides:
            spans = word_spans(seq.words, seq.offsets)
            cols["doc_id"] += [doc_ids[w.doc_index]] * len(spans)
            cols["window_index"] += [w.window] * len(spans)
            cols["side"] += [side] * len(spans)
            cols["word_index"] += range(len(spans))
            for start, end, first, last in spans:
                cols["text"].append(text[start:end])
                cols["char_start"].append(start)
                cols["char_end"].append(end)
                cols["first_position"].append(first)
                cols["last_position"].append(last)
                cols["special"].append(all(seq.special[first:last + 1]))
    return cols


def output_columns(out: Output, doc_index: np.ndarray, window_ids: np.ndarray) -> dict:
    """Recipe columns -> table columns: batch_index becomes doc_index (the writer turns it into
    doc_id) and window_index; the writer adds the recipe's name and parameters."""
    cols = dict(out.columns)
    index = cols.pop("batch_index")
    if "weights.values" in cols:  # dense: flat values + row lengths -> list column
        offsets = np.concatenate([[0], np.cumsum(cols.pop("weights.lengths"))]).astype(np.int32)
        cols["weights"] = pa.ListArray.from_arrays(offsets, cols.pop("weights.values"))
    return {"doc_index": doc_index[index], "window_index": window_ids[index], **cols}


class BackgroundWriter:
    """Runs the writes on a thread, so the model never waits on Arrow conversion, Parquet
    encoding or the disk (pyarrow and the CUDA event wait release the GIL). At most `depth`
    batches wait, which bounds the memory; an error on the thread is raised in the caller at its
    next `put` or at `close`."""

    def __init__(self, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="attnpipe-writer")
        self.thread.start()

    def _run(self) -> None:
        while (task := self.queue.get()) is not None:
            if isinstance(task, threading.Event):  # wait(): every task before it is done
                task.set()
            elif self.error is None:
                try:
                    task()
                except BaseException as exc:  # re-raised in the caller
                    self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, task) -> None:
        self._check()
        self.queue.put(task)

    def wait(self) -> None:
        """Return once every task put so far is done (raising its error, if any)."""
        done = threading.Event()
        self.put(done)
        done.wait()
        self._check()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


def _reduce(rt: Runtime, chosen: list[tuple[int, Window]],
            stats: dict) -> list[tuple[list[tuple[int, Window]], PendingBatch]]:
    """The batch through the model; when CUDA runs out of memory, halves of it, recursively."""
    keep = {}  # interventions: the capture pass's outputs are their unedited reference
    if rt.job.interventions:
        from .control.run import output_kwargs

        keep = {"keep": output_kwargs(rt.job)}
    try:
        return [(chosen, reduce_batch_async(rt.model, [w for _, w in chosen], rt.job.recipes, **keep))]
    except torch.OutOfMemoryError:
        if len(chosen) == 1:
            raise ModelError(f"one window of {len(chosen[0][1])} tokens does not fit in GPU memory with these "
                             "recipes; lower model.max_length, or drop per-head dense or threshold recipes") from None
        stats["oom_halvings"] += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(chosen) // 2
        return _reduce(rt, chosen[:half], stats) + _reduce(rt, chosen[half:], stats)


def _write_batch(writer: ShardWriter, background: BackgroundWriter, rt: Runtime,
                 batch: list[tuple[int, Window]], docs: ShardDocs, stats: dict) -> None:
    """One batch through the model; its rows go to the writer thread."""
    job = rt.job
    for chosen, pending in _reduce(rt, batch, stats):
        doc_index = np.array([doc for doc, _ in chosen], dtype=np.int32)
        window_ids = np.array([w.window for _, w in chosen], dtype=np.int32)

        def write(pending=pending, doc_index=doc_index, window_ids=window_ids) -> None:
            for output in pending.outputs():
                table = RECIPES[job.recipes[output.recipe]["name"]].table
                cols = output_columns(output, doc_index, window_ids)
                if "from_group" in cols:  # the groups recipe's group indices -> the [[groups]] names
                    names = np.array([g.name for g in job.groups], dtype=object)
                    cols["from_group"], cols["to_group"] = names[cols["from_group"]], names[cols["to_group"]]
                writer.write_batch(table, cols, layer=output.layer, recipe=output.recipe, site=output.site)

        background.put(write)
        if rt.job.interventions:
            _write_effects(writer, background, rt, chosen, docs, pending, doc_index, window_ids)
    faults.point("batch")


def _write_effects(writer: ShardWriter, background: BackgroundWriter, rt: Runtime, chosen: list[tuple[int, Window]],
                   docs: ShardDocs, pending: PendingBatch, doc_index: np.ndarray, window_ids: np.ndarray) -> None:
    """The batch's interventions, measured against its capture pass; rows to the writer thread."""
    from .control.run import effects_bounded, window_docs

    clean, pending.clean = pending.clean, None  # the writer thread needs only the recipe rows
    cols = effects_bounded(rt, [w for _, w in chosen], window_docs(rt, chosen, docs), clean, rt.effect_targets)
    index = np.asarray(cols.pop("batch_index"), dtype=np.int64)
    cols = {"doc_index": doc_index[index], "window_index": window_ids[index], **cols}
    background.put(lambda: writer.write_batch("effects", cols))


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
                         buffer_bytes=job.run.buffer_mb << 20,
                         site_folders=job.corpus.target_column is not None
                         or len(getattr(rt.model, "site_kinds", ())) > 1,
                         heads=getattr(rt.model, "num_heads", None)) as writer:
            writer.recipes = {i: (r["name"], recipe_params(r)) for i, r in enumerate(job.recipes)}
            writer.doc_ids = docs.doc_ids
            counts = _write_documents(writer, rt, docs, progress)
            if counts["oom_halvings"]:
                log.warning("shard %d: CUDA ran out of memory %d times; those batches were halved and retried "
                            "(a smaller run.batch_tokens avoids it)", spec.index, counts["oom_halvings"])
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
    if rt.job.generate is not None:
        from .generate.run import write_generations

        return write_generations(writer, rt, docs, progress)
    counts = {"tokens": 0, "windows": 0, "empty": 0, "oom_halvings": 0}
    pool = WindowPool(rt.job.run.batch_tokens)
    remaining = np.zeros(len(docs.rows), dtype=np.int64)  # windows of each document not yet reduced
    share = np.zeros(len(docs.rows))  # characters per window, for the ETA
    background = BackgroundWriter()

    def reduce_ready(final: bool = False) -> None:
        for batch in pool.batches(final):
            _write_batch(writer, background, rt, batch, docs, counts)
            done = np.bincount([doc for doc, _ in batch], minlength=len(remaining))
            remaining[:] -= done
            if progress:
                progress(int(((done > 0) & (remaining == 0)).sum()), sum(len(w) for _, w in batch),
                         int((share * done).sum()))

    try:
        for part in doc_chunks(docs):
            windows = _tokenize_chunk(writer, background, rt, docs, part, counts)
            per_doc = np.bincount([w.doc_index for w in windows], minlength=part.stop - part.start)
            remaining[part] = per_doc
            share[part] = docs.chars[part] / np.maximum(per_doc, 1)
            counts["empty"] += int((per_doc == 0).sum())
            if progress:
                progress(int((per_doc == 0).sum()), 0, int(docs.chars[part][per_doc == 0].sum()))
            pool.add(part.start, windows)
            reduce_ready()
            # documents before the first unfinished one are complete: their rows can become row groups
            pending = np.flatnonzero(remaining[:part.stop] > 0)
            upto = int(pending[0]) if len(pending) else part.stop
            if rt.model.device.type != "cpu":  # on the writer thread, while the model runs the next chunk
                background.put(lambda upto=upto: writer.seal(upto))
            elif writer.runs_bytes() >= CPU_SEAL_BYTES:
                # The CPU path: the model's threads have every core, and a seal beside them slowed
                # its attention and recipes by 1.3-1.4x (benchmarks/profile_cpu.py). So runs wait on
                # disk until they pass CPU_SEAL_BYTES, or until finalize, and are then sealed on
                # every core while the model waits.
                background.wait()
                writer.seal_now(upto)
        reduce_ready(final=True)
    finally:
        background.close()
    return counts


def _tokenize_chunk(writer: ShardWriter, background: BackgroundWriter, rt: Runtime, docs: ShardDocs,
                    part: slice, counts: dict) -> list[Window]:
    """A chunk's windows; its documents and tokens rows go to the writer thread."""
    job, tok = rt.job, rt.model.tokenizer
    rows = docs.rows[part]
    texts, targets = rt.corpus.texts(rows), rt.corpus.targets(rows)
    if targets is None:
        windows = tokenize(tok, texts, rt.window_length, job.model.stride)
    else:  # source/target pairs: one window each, never split
        windows = tokenize_pairs(rt.model, texts, targets, rt.window_length, docs.doc_ids[part])
    if getattr(job, "groups", None):  # the job's token groups, for the groups recipe
        _assign_groups(rt, windows, texts, rows)
    doc_cols = {**document_columns(docs, part, windows, texts, job.model.stride), **rt.corpus.sources(rows),
                **rt.corpus.metadata(rows)}
    background.put(lambda: writer.write_batch("documents", doc_cols, extra=rt.corpus.metadata_schema()))
    token_cols = token_columns(docs.doc_ids[part], windows, tok)
    background.put(lambda: writer.write_batch("tokens", token_cols))
    word_cols = word_columns(docs.doc_ids[part], windows, texts, targets)
    background.put(lambda: writer.write_batch("words", word_cols))
    counts["tokens"] += len(token_cols["position"])  # both sides of pairs: the tokens table's rows
    counts["windows"] += len(windows)
    return windows


def _assign_groups(rt: Runtime, windows: list[Window], texts: list[str], rows: np.ndarray) -> None:
    """Each window's tokens in each [[groups]] entry (pipeline/groups.py)."""
    from .groups import token_groups

    marks = rt.corpus.marks(rows)
    spans = [[m.spans(text, marked) for m in rt.group_matchers] for text, marked in zip(texts, marks)]
    for w in windows:
        w.groups = token_groups(w.offsets, w.special, spans[w.doc_index])


def record_info(rt: Runtime, r: ShardResult) -> dict:
    """What a completion record says besides its files."""
    return {"job_fingerprint": rt.job.fingerprint(), "inputs": r.inputs, "corpus_rows": list(r.corpus_rows),
            "weights": rt.weights_id,
            "documents": r.documents, "empty_documents": r.empty_documents,
            "repeated_texts": r.repeated_texts, "windows": r.windows, "tokens": r.tokens,
            "rows": r.rows, "seconds": r.seconds, "provenance": rt.provenance}
