"""The step: one shard of the corpus in, its Parquet files out.

`run_shard` does not know which executor calls it (in-process today; a Dask worker runs the
same function). It returns what the manifest records about the shard.
"""

from __future__ import annotations

import time
from typing import Callable

import datasets
import numpy as np
import pyarrow as pa

from .corpus import Documents, documents_of, text_sha1
from .job import JobSpec
from .model import LoadedModel
from .recipes import RECIPES, recipe_params
from .reduce import Output, reduce_batch
from .windows import Window, make_batches, tokenize
from .writer import ShardWriter

# progress(documents_finished, tokens_processed)
Progress = Callable[[int, int], None]


def window_length(job: JobSpec, lm: LoadedModel) -> int:
    return job.model.max_length or lm.max_length


def document_columns(docs: Documents, windows: list[Window], shard: int, stride: int) -> dict:
    n = len(docs.doc_ids)
    count = np.zeros(n, dtype=np.int32)
    content = np.zeros(n, dtype=np.int64)
    for w in windows:
        # Windows after the first repeat `stride` content tokens of the one before.
        content[w.doc_index] += sum(not s for s in w.special) - (stride if w.window else 0)
        count[w.doc_index] += 1
    return {"doc_id": docs.doc_ids, "shard": [shard] * n, "n_tokens": content, "windows": count,
            "text_sha1": [text_sha1(t) for t in docs.texts], "empty": [not t.strip() for t in docs.texts],
            **docs.metadata}


def token_columns(docs: Documents, windows: list[Window], tokenizer) -> dict:
    cols: dict[str, list] = {k: [] for k in ("doc_id", "window", "position", "token_id", "token",
                                             "char_start", "char_end", "special")}
    for w in windows:
        n = len(w)
        cols["doc_id"] += [docs.doc_ids[w.doc_index]] * n
        cols["window"] += [w.window] * n
        cols["position"] += range(n)
        cols["token_id"] += w.input_ids
        cols["token"] += tokenizer.convert_ids_to_tokens(w.input_ids)
        cols["char_start"] += [s for s, _ in w.offsets]
        cols["char_end"] += [e for _, e in w.offsets]
        cols["special"] += w.special
    return cols


def output_columns(out: Output, spec: dict, doc_ids: pa.Array, window_ids: np.ndarray) -> dict:
    """Recipe columns -> table columns: batch_index becomes doc_id and window."""
    cols = dict(out.columns)
    index = cols.pop("batch_index")
    if "weights.values" in cols:  # dense: flat values + row lengths -> list column
        offsets = np.concatenate([[0], np.cumsum(cols.pop("weights.lengths"))]).astype(np.int32)
        cols["weights"] = pa.ListArray.from_arrays(offsets, cols.pop("weights.values"))
    rows = len(index)
    return {"doc_id": doc_ids.take(pa.array(index)), "window": window_ids[index], **cols,
            "recipe": _repeat(spec["name"], rows), "recipe_params": _repeat(recipe_params(spec), rows)}


def _repeat(value: str, rows: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(rows, dtype=np.int32)))


def run_shard(job: JobSpec, shard: int, data: datasets.Dataset, lm: LoadedModel, out,
              provenance: dict, progress: Progress | None = None) -> dict:
    """Process one shard; return its manifest entry (counts, rows per table, files, seconds)."""
    started = time.perf_counter()
    docs = documents_of(data, job.corpus)
    stride = job.model.stride
    windows = tokenize(lm.tokenizer, docs.texts, window_length(job, lm), stride)
    remaining = np.bincount([w.doc_index for w in windows], minlength=len(docs.texts))
    extra = pa.schema([data.features.arrow_schema.field(c) for c in job.corpus.metadata_columns])
    with ShardWriter(out, shard, provenance) as writer:
        writer.write_batch("documents", document_columns(docs, windows, shard, stride), extra=extra)
        writer.write_batch("tokens", token_columns(docs, windows, lm.tokenizer))
        if progress:
            progress(int((remaining == 0).sum()), 0)
        for batch in make_batches(windows, job.run.batch_tokens):
            chosen = [windows[i] for i in batch]
            doc_ids = pa.array([docs.doc_ids[w.doc_index] for w in chosen], pa.string())
            window_ids = np.array([w.window for w in chosen], dtype=np.int32)
            for output in reduce_batch(lm, chosen, job.recipes):
                spec = job.recipes[output.recipe]
                writer.write_batch(RECIPES[spec["name"]].table,
                                   output_columns(output, spec, doc_ids, window_ids), layer=output.layer)
            if progress:
                finished = 0
                for w in chosen:
                    remaining[w.doc_index] -= 1
                    finished += int(remaining[w.doc_index] == 0)
                progress(finished, sum(len(w) for w in chosen))
        rows = writer.finalize()
    return {"shard": shard, "documents": len(docs.texts),
            "empty_documents": sum(not t.strip() for t in docs.texts), "windows": len(windows),
            "tokens": sum(len(w) for w in windows), "rows": rows, "files": writer.files,
            "seconds": round(time.perf_counter() - started, 3)}
