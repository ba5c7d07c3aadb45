"""The CPU path's speed-ups change no data.

- Windows pooled across chunk boundaries: each window reaches the model once, batches stay full,
  and a shard cut into many small chunks stores what one chunk stores.
- Probabilities formed a few windows at a time (`reduce.window_slices`): one window per slice
  gives the same rows as the whole batch, stateful rollout included, on every architecture,
  from both backends.
- The writer's integer doc_index and writer-filled recipe columns store what doc_id strings and
  per-row recipe columns stored.
- glibc malloc keeps freed blocks on CPU workers, and can be turned off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from attnpipe import reduce as reduce_module
from attnpipe import shard as shard_module
from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.recipes import validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.shard import WindowPool
from attnpipe.store.writer import ShardWriter
from attnpipe.windows import Window, make_batches, tokenize

from conftest import ARCHS, loaded, write_job
from test_backends import RECIPES, assert_same_tables

SPECS = [validate_recipe(r, "test") for r in (
    {"name": "head_stats"}, {"name": "topk", "k": 3}, {"name": "topk", "k": 2, "per_head": False},
    {"name": "threshold", "t": 0.2}, {"name": "topp", "p": 0.5, "per_head": False}, {"name": "rollout", "k": 3},
    {"name": "dense", "max_tokens": 16})]
TEXTS = ["The animal didn't cross the street because it was too tired.", "Tiny.", "A mill, a river; a town!",
         " ".join(f"Sentence {i} is about the river and the mill." for i in range(6))]


def _windows(lengths: list[int]) -> list[Window]:
    return [Window(i, 0, [1] * n, [(0, 0)] * n, [False] * n) for i, n in enumerate(lengths)]


def test_window_pool_sends_each_window_once_in_full_batches():
    rng = np.random.default_rng(0)
    chunks = [_windows(list(rng.integers(1, 40, size=int(rng.integers(1, 30))))) for _ in range(12)]
    pool, seen, batches = WindowPool(batch_tokens=64), [], []
    first = 0
    for chunk in chunks:
        pool.add(first, chunk)
        ready = pool.batches()
        if ready and pool.waiting:  # the waiting windows are the last documents': all before are done
            assert min(d for d, _ in pool.waiting) > max(d for b in ready for d, _ in b)
        batches += ready
        assert pool.tokens <= 64 * shard_module.UNIT_BATCHES + sum(len(w) for w in chunk)
        first += len(chunk)
    batches += pool.batches(final=True)
    assert not pool.waiting and pool.tokens == 0
    for batch in batches:
        padded = len(batch) * max(len(w) for _, w in batch)
        assert padded <= 64 or len(batch) == 1
        seen += [(doc, w.doc_index) for doc, w in batch]
    expected = [(first_doc + w.doc_index, w.doc_index)
                for first_doc, chunk in zip(np.cumsum([0] + [len(c) for c in chunks]), chunks) for w in chunk]
    assert sorted(seen) == sorted(expected)
    # Pooling across chunk boundaries: fewer batches than batching each chunk on its own, and
    # padding within 10% of sorting every window at once.
    def padded(batch):
        return len(batch) * max(len(w) for w in batch)

    per_chunk = [[c[i] for i in b] for c in chunks for b in make_batches(c, 64)]
    everything = [w for c in chunks for w in c]
    at_once = [[everything[i] for i in b] for b in make_batches(everything, 64)]
    assert len(batches) < len(per_chunk)
    assert sum(padded([w for _, w in b]) for b in batches) <= 1.1 * sum(padded(b) for b in at_once)


def test_many_small_chunks_store_what_one_chunk_stores(tmp_path, tiny_model_dir, monkeypatch):
    texts = TEXTS * 5 + [""]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def run(name):
        folder = tmp_path / name
        folder.mkdir()
        job = write_job(folder, corpus, tiny_model_dir("bert"), recipes=RECIPES, device="cpu",
                        weight_dtype="float32", batch_tokens=96)
        return run_job(load_job(job), quiet=True)

    whole = run("whole")
    monkeypatch.setattr(shard_module, "CHUNK_DOCS", 2)
    monkeypatch.setattr(shard_module, "UNIT_BATCHES", 1)
    chunked = run("chunked")
    assert_same_tables(whole.output, chunked.output, tables=("head_stats", "edges", "rollout", "maps", "tokens"))
    docs = [pq.read_table(f).to_pandas().sort_values("doc_id") for f in
            (next((r.output / "documents").glob("*.parquet")) for r in (whole, chunked))]
    assert docs[0]["windows"].tolist() == docs[1]["windows"].tolist()
    assert docs[0]["empty"].sum() == 1
    # The CPU path seals only once the runs pass CPU_SEAL_BYTES (else at finalize): past it after
    # every chunk, the complete documents are sealed mid-run, on every core, and store the same.
    seals = []
    seal_now = ShardWriter.seal_now
    monkeypatch.setattr(ShardWriter, "seal_now", lambda self, upto: (seals.append(upto), seal_now(self, upto)))
    monkeypatch.setattr(shard_module, "CPU_SEAL_BYTES", 1)
    sealed = run("sealed")
    assert len(seals) > 2 and seals[-1] == 1 << 31 and seals[:-1] == sorted(seals[:-1])
    assert_same_tables(whole.output, sealed.output, tables=("head_stats", "edges", "rollout", "maps", "tokens"))


def test_background_writer_wait_returns_after_the_tasks_and_raises_their_error():
    background, done = shard_module.BackgroundWriter(), []
    background.put(lambda: done.append(1))
    background.wait()
    assert done == [1]

    def fail():
        raise OSError("disk full")

    background.put(fail)
    background.put(lambda: done.append(2))  # skipped: the writer stops at its first error
    with pytest.raises(OSError, match="disk full"):
        background.wait()
    assert done == [1]
    background.queue.put(None)
    background.thread.join()


def _padded_windows(tokenizer) -> list[Window]:
    return tokenize(tokenizer, TEXTS, 24, 8)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_window_slices_give_the_whole_batch_rows(arch, backend, tokenizer, monkeypatch):
    lm, _ = loaded(arch, tokenizer)
    lm.backend = backend
    windows = _padded_windows(tokenizer)
    assert len({len(w) for w in windows}) > 1  # padding in the batch
    monkeypatch.setattr(reduce_module, "CPU_SLICE_BYTES", 1 << 40)
    assert len(reduce_module.window_slices(lm, len(windows), 24)) == 1
    whole = reduce_batch(lm, windows, SPECS)
    monkeypatch.setattr(reduce_module, "CPU_SLICE_BYTES", 1)
    assert len(reduce_module.window_slices(lm, len(windows), 24)) == len(windows)
    sliced = reduce_batch(lm, windows, SPECS)
    assert [(o.recipe, o.layer) for o in whole] == [(o.recipe, o.layer) for o in sliced]
    for a, b in zip(whole, sliced):
        assert a.columns.keys() == b.columns.keys()
        for name, col in a.columns.items():
            if col.dtype.kind == "f":  # the same products on fewer windows: float32 rounding at most
                np.testing.assert_allclose(col, b.columns[name], atol=1e-6, err_msg=f"{SPECS[a.recipe]} {name}")
            else:
                np.testing.assert_array_equal(col, b.columns[name], err_msg=f"{SPECS[a.recipe]} {name}")


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_probabilities_of_some_windows_equal_those_of_the_batch(arch, tokenizer):
    """LayerInputs.probs_rows: the batch's probabilities for windows lo..hi, GQA keys repeated,
    T5's position bias and the padding mask sliced with them."""
    from attnpipe.capture import capture_layers
    from attnpipe.windows import collate

    lm, _ = loaded(arch, tokenizer)
    ids, mask = collate(_padded_windows(tokenizer), lm.pad_id)
    seen = []
    with capture_layers(seen.append, backend="sdpa", model=lm.model, causal=lm.causal):
        lm.forward(ids, mask)
    for inputs in seen:
        whole = inputs.probs
        for lo, hi in ((0, 1), (1, 3), (2, len(ids))):
            torch.testing.assert_close(inputs.probs_rows(lo, hi), whole[lo:hi], atol=1e-6, rtol=0)


def _edge_columns(doc_index: np.ndarray) -> dict:
    n = len(doc_index)
    return {"window_index": np.zeros(n, np.int32), "head": np.zeros(n, np.int16),
            "query_pos": np.arange(n, dtype=np.int32) % 7, "key_pos": np.arange(n, dtype=np.int32) % 5,
            "weight": np.linspace(0, 1, n, dtype=np.float32)}


def test_writer_doc_index_and_recipe_columns(tmp_path):
    ids = [f"doc-{i:03d}" for i in range(40)]
    rng = np.random.default_rng(1)
    index = rng.integers(0, len(ids), size=5000).astype(np.int32)
    tables = {}
    for how in ("doc_index", "doc_id"):
        with ShardWriter(tmp_path / how, 0, "00000000", {}, weight_dtype="float32", flush_rows=1500) as w:
            w.recipes = {0: ("topk", '{"k":8,"per_head":true}')}
            w.doc_ids = ids
            for part in np.array_split(index, 7):
                cols = _edge_columns(part)
                if how == "doc_index":
                    w.write_batch("edges", {"doc_index": part, **cols}, layer=0, recipe=0)
                else:  # doc_id strings, as the documents and tokens tables give them
                    w.write_batch("edges", {"doc_id": [ids[i] for i in part], **cols}, layer=0, recipe=0)
            files = w.finalize()
            tables[how] = pq.read_table(w.staging / files[0].path)
    a = tables["doc_index"]
    assert a.column_names == tables["doc_id"].column_names
    # the same rows; their layout differs (doc_index rows are merged into bands of heads)
    keys = [(c, "ascending") for c in ("doc_id", "window_index", "head", "query_pos", "key_pos", "weight")]
    assert a.sort_by(keys).equals(tables["doc_id"].sort_by(keys))
    assert set(a.column("recipe").to_pylist()) == {"topk"}
    assert set(a.column("recipe_params").to_pylist()) == {'{"k":8,"per_head":true}'}


def test_writer_refuses_unsorted_doc_ids_and_recipe_columns_from_the_producer(tmp_path):
    with ShardWriter(tmp_path, 0, "00000000", {}) as w:
        with pytest.raises(ValueError, match="sorted"):
            w.doc_ids = ["b", "a"]
        with pytest.raises(ValueError, match="sorted"):
            w.doc_ids = ["a", "a"]
        with pytest.raises(ValueError, match="doc_ids"):
            w.write_batch("edges", {"doc_index": np.zeros(1, np.int32), **_edge_columns(np.zeros(1))}, layer=0)
            w.finalize()
        w.recipes = {0: ("topk", "{}")}
        w.doc_ids = ["a"]
        with pytest.raises(ValueError, match="filled by the writer"):
            w.write_batch("edges", {"doc_index": np.zeros(1, np.int32), **_edge_columns(np.zeros(1)),
                                    "recipe": ["topk"]}, layer=0, recipe=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("setting, expected", [(None, "True"), ("0", "False")])
def test_cpu_workers_keep_freed_memory(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "ATTNPIPE_KEEP_FREED_MEMORY"}
    if setting is not None:
        env["ATTNPIPE_KEEP_FREED_MEMORY"] = setting
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", "from attnpipe.hostmem import keep_freed_memory as k; "
                          "print(k(), k())"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, expected]


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_doc_ids_of_a_row_group(order):
    """The writer's doc_id column for rows given by doc_index: a dictionary of the row group's own
    documents (one pass when the rows come in document order, as sealed row groups do)."""
    import pyarrow as pa

    from attnpipe.store.writer import _doc_ids

    ids = pa.array([f"doc-{i:03d}" for i in range(50)])
    index = np.random.default_rng(1).integers(3, 40, 500).astype(np.int32)
    index = np.sort(index) if order == "sorted" else index
    column = _doc_ids(ids, pa.array(index))
    column.validate(full=True)
    assert column.to_pylist() == [f"doc-{i:03d}" for i in index]
    assert column.dictionary.to_pylist() == [f"doc-{i:03d}" for i in np.unique(index)]
    with pytest.raises(ValueError, match="doc_index 50 outside the shard's 50 documents"):
        _doc_ids(ids, pa.array(np.array([2, 50], np.int32)))
