"""A shard of a generate run: documents in doc_id order, chunk by chunk; each chunk's prompts in
batches of generate.batch_size (sorted by length, so little padding), and every table's rows to
the writer thread as each batch finishes. What the shard commits is the same as for a forward
run (pipeline/shard.py), plus the generations and grounding tables.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import faults
from ..corpus import ShardDocs
from ..runtime import Runtime
from ..shard import BackgroundWriter, Progress, doc_chunks, document_columns, token_columns, word_columns
from ..store.schema import table_schema
from ..store.writer import ShardWriter
from .decode import Generated, generate_batch
from .prompts import Prompt, build_prompts

SITE = ("decoder", "self")
WINDOWED = ("edges", "head_stats", "rollout", "maps")  # tables with a window_index column
STEPPED = ("edges", "head_stats")  # ... and with a step column


def write_generations(writer: ShardWriter, rt: Runtime, docs: ShardDocs, progress: Progress | None) -> dict:
    """Every document of the shard through generation and into the writer."""
    counts = {"tokens": 0, "windows": 0, "empty": 0, "oom_halvings": 0}
    gen, lm = rt.job.generate, rt.model
    background = BackgroundWriter()
    try:
        for part in doc_chunks(docs):
            rows = docs.rows[part]
            names = docs.doc_ids[part]
            texts = rt.corpus.texts(rows)
            prompts = build_prompts(lm.tokenizer, texts, rt.corpus.contexts(rows), names, gen,
                                    rt.window_length, gen.max_new_tokens)
            results: dict[int, Generated] = {}
            order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i]))
            empty = len(prompts) - len(order)
            counts["empty"] += empty
            if progress and empty:
                progress(empty, 0, 0)
            for start in range(0, len(order), gen.batch_size):
                chosen = order[start:start + gen.batch_size]
                doc_index = part.start + np.array(chosen, dtype=np.int32)
                emit = _emitter(writer, background, doc_index)
                done = generate_batch(lm, [prompts[i] for i in chosen], [names[i] for i in chosen], gen,
                                      rt.job.recipes, emit)
                results.update(zip(chosen, done))
                if rt.job.interventions:  # the same prompts again, with each intervention (pipeline/control)
                    from ..control.generate import generate_effects

                    cols = generate_effects(rt, [prompts[i] for i in chosen], [names[i] for i in chosen], doc_index)
                    background.put(lambda cols=cols: writer.write_batch("effects", cols))
                faults.point("batch")
                if progress:
                    progress(len(chosen), sum(len(prompts[i]) + len(g.ids) for i, g in zip(chosen, done)),
                             int(docs.chars[part][chosen].sum()))
            _write_chunk(writer, background, rt, docs, part, texts, prompts, results, counts)
    finally:
        background.close()
    return counts


def _emitter(writer: ShardWriter, background: BackgroundWriter, doc_index: np.ndarray):
    def emit(table: str, layer: int | None, recipe: int | None, cols: dict) -> None:
        cols = dict(cols)
        index = doc_index[cols.pop("batch_index")]
        lead = {"doc_index": index}
        if table in WINDOWED:
            lead["window_index"] = np.zeros(len(index), dtype=np.int32)
        if table in STEPPED and "step" not in cols:  # the prompt's rows, beside step rows in one buffer
            cols["step"] = pa.nulls(len(index), pa.int32())
        given = {**lead, **cols}
        columns = {"doc_index": index, **{c: given[c] for c in table_schema(table).column_names if c in given}}
        background.put(lambda: writer.write_batch(table, columns, layer=layer, recipe=recipe, site=SITE))
    return emit


def _write_chunk(writer: ShardWriter, background: BackgroundWriter, rt: Runtime, docs: ShardDocs, part: slice,
                 texts: list[str], prompts: list[Prompt | None], results: dict[int, Generated], counts: dict) -> None:
    """The chunk's documents, tokens (prompt and generated), words and generations rows."""
    tok = rt.model.tokenizer
    names = docs.doc_ids[part]
    windows = [p.window for p in prompts if p is not None]
    prompt_texts = [p.text if p is not None else "" for p in prompts]
    n = len(prompts)
    doc_cols = {**document_columns(docs, part, windows, texts, 0), **rt.corpus.sources(rows := docs.rows[part]),
                "prompt_text": [p.text if p is not None else None for p in prompts],
                "generated_text": [results[i].text if i in results else None for i in range(n)],
                "generated_tokens": [len(results[i].ids) if i in results else None for i in range(n)],
                "stop_reason": [results[i].stop_reason if i in results else None for i in range(n)],
                **rt.corpus.metadata(rows)}
    background.put(lambda: writer.write_batch("documents", doc_cols, extra=rt.corpus.metadata_schema()))
    token_cols = token_columns(names, windows, tok)
    token_cols["segment"] = [seg for p in prompts if p is not None for seg in p.segments]
    gen_cols = {k: [] for k in ("doc_id", "step", "position", "token_id", "token", "char_start", "char_end",
                                "logprob", "entropy", "stop")}
    specials = set(tok.all_special_ids)
    for i in sorted(results):
        g, length = results[i], len(prompts[i])
        steps = len(g.ids)
        pieces = tok.convert_ids_to_tokens(g.ids)
        gen_cols["doc_id"] += [names[i]] * steps
        gen_cols["step"] += range(steps)
        gen_cols["position"] += range(length, length + steps)
        gen_cols["token_id"] += g.ids
        gen_cols["token"] += pieces
        gen_cols["char_start"] += [a for a, _ in g.offsets]
        gen_cols["char_end"] += [b for _, b in g.offsets]
        gen_cols["logprob"] += g.logprobs
        gen_cols["entropy"] += g.entropies
        gen_cols["stop"] += [False] * (steps - 1) + [g.stop_reason in ("eos", "stop")]
        for key, values in (("doc_id", [names[i]] * steps), ("window_index", [0] * steps),
                            ("side", ["generated"] * steps), ("position", range(length, length + steps)),
                            ("token_id", g.ids), ("token", pieces), ("char_start", [a for a, _ in g.offsets]),
                            ("char_end", [b for _, b in g.offsets]), ("special", [t in specials for t in g.ids]),
                            ("word_index", [None] * steps), ("segment", ["generated"] * steps)):
            token_cols[key] += values
    background.put(lambda: writer.write_batch("tokens", token_cols))
    background.put(lambda: writer.write_batch("generations", gen_cols))
    word_cols = word_columns(names, windows, prompt_texts, None)
    background.put(lambda: writer.write_batch("words", word_cols))
    counts["tokens"] += len(token_cols["position"])
    counts["windows"] += len(windows)
