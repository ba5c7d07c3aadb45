"""The writer's external sort (store/runs.py): spilled runs merge to exactly the full sort, in
bounded memory, and sealed row groups are even, one band of heads each, with a document's rows
together. Reference: pyarrow's sort of all rows at once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnpipe.store import runs
from attnpipe.store.writer import ShardWriter

ORDER = ["doc_index", "window_index", "head", "query_pos", "key_pos"]
HEADS = 6


def edge_rows(rng, docs: np.ndarray, windows: int = 2, keys: int = 3) -> pa.Table:
    """Per-head top-k rows of `docs`, in the producer's order, key positions unsorted."""
    cols = {c: [] for c in ORDER + ["weight"]}
    for d in docs:
        for w in range(rng.integers(1, windows + 1)):
            for h in range(HEADS):
                for q in range(rng.integers(1, 5)):
                    k = rng.choice(16, size=keys, replace=False)
                    cols["doc_index"] += [d] * keys
                    cols["window_index"] += [w] * keys
                    cols["head"] += [h] * keys
                    cols["query_pos"] += [q] * keys
                    cols["key_pos"] += k.tolist()
                    cols["weight"] += rng.random(keys).tolist()
    types = {"doc_index": pa.int32(), "window_index": pa.int32(), "head": pa.int16(),
             "query_pos": pa.int32(), "key_pos": pa.int32(), "weight": pa.float32()}
    return pa.table({c: pa.array(v, types[c]) for c, v in cols.items()})


def reference(table: pa.Table) -> pa.Table:
    band = pa.array(runs.head_band(table.column("head").to_numpy(), HEADS))
    return (table.append_column("band", band)
            .sort_by([("band", "ascending")] + [(c, "ascending") for c in ORDER]).drop_columns(["band"]))


def spilled(tmp_path, tables: list[pa.Table], name: str = "a") -> runs.SpillFile:
    spill = runs.SpillFile(tmp_path / f"{name}.arrow", tables[0].schema)
    for t in tables:
        spill.add_run(*runs.sort_run(t, runs.sort_keys(t, HEADS), ORDER))
    spill.close_writer()
    return spill


def merged(segments, order=ORDER) -> pa.Table:
    return pa.concat_tables([t for t, _ in runs.merge(segments, order)])


def test_head_bands():
    assert runs.head_band(np.arange(12), 12).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert runs.head_band(np.arange(4), 4).tolist() == [0, 0, 1, 2]
    assert runs.head_band(np.arange(3), None).tolist() == [0, 1, 2]  # unknown: one band per head


@pytest.mark.parametrize("batch_rows", [7, 1 << 13])
def test_merge_of_overlapping_runs_is_the_full_sort(tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr(runs, "BATCH_ROWS", batch_rows)
    rng = np.random.default_rng(0)
    docs = rng.permutation(40)
    tables = [edge_rows(rng, np.sort(part)) for part in np.array_split(docs, 5)]  # runs overlap
    spill = spilled(tmp_path, tables)
    assert len(spill.segments) == 5 * 3  # a segment per band per run
    assert merged(spill.segments).equals(reference(pa.concat_tables(tables)))


def test_one_window_split_across_runs_is_still_ordered(tmp_path, monkeypatch):
    """Two runs hold rows of the same (band, doc, window) key: the merge falls back to the
    columns' order inside the key."""
    monkeypatch.setattr(runs, "BATCH_ROWS", 5)
    rng = np.random.default_rng(1)
    rows = edge_rows(rng, np.arange(6))
    halves = [rows.filter(pa.array(rng.random(rows.num_rows) < 0.5)) for _ in range(1)]
    other = rows.filter(pa.compute.invert(pa.compute.is_in(rows.column("weight"), halves[0].column("weight"))))
    spill = spilled(tmp_path, [halves[0], other])
    assert merged(spill.segments).equals(reference(rows))


def test_bounded_fan_in_merges_in_passes(tmp_path):
    rng = np.random.default_rng(2)
    docs = rng.permutation(60)
    tables = [edge_rows(rng, np.sort(part)) for part in np.array_split(docs, 12)]
    spill = spilled(tmp_path, tables)
    assert runs.overlap_depth(spill.segments) == 12
    made = []

    def scratch():
        made.append(runs.SpillFile(tmp_path / f"pass-{len(made)}.arrow", tables[0].schema))
        return made[-1]

    segments = runs.bounded(spill.segments, 3, ORDER, scratch)
    assert runs.overlap_depth(segments) <= 3 and len(made) >= 2
    assert not spill.path.exists()  # each pass removes the files it merged
    assert merged(segments).equals(reference(pa.concat_tables(tables)))


def test_disjoint_runs_open_one_at_a_time(tmp_path):
    """Runs over consecutive documents (one long document's windows, or chunk after chunk) never
    overlap: the merge holds one run's batch at a time, whatever their number."""
    rng = np.random.default_rng(3)
    tables = [edge_rows(rng, np.array([d])) for d in range(30)]
    spill = spilled(tmp_path, tables)
    assert runs.overlap_depth(spill.segments) == 1
    assert merged(spill.segments).equals(reference(pa.concat_tables(tables)))


def test_cuts_are_even_and_at_document_boundaries():
    rng = np.random.default_rng(4)
    sizes = rng.integers(5, 60, 400)
    keys = np.repeat(np.arange(400, dtype=np.int64) << 24, sizes)
    ends = runs.cuts(keys, 1000, final=True) + [len(keys)]
    lengths = np.diff([0] + ends)
    assert lengths.min() >= 0.85 * 1000 * 0.9 and lengths.max() <= 1.15 * 1000 * 1.1
    doc = runs.key_doc(keys)
    assert all(doc[e - 1] != doc[e] for e in ends[:-1])  # never inside a short document
    # streaming: only cuts that later rows cannot move, each within 10% of the target
    part = runs.cuts(keys[:5000], 1000, final=False)
    assert part[-1] + 1100 >= 5000 - 60 and np.all(np.abs(np.diff([0] + part) - 1000) <= 100)
    assert all(doc[e - 1] != doc[e] for e in part)


def test_cuts_split_a_long_document():
    keys = np.concatenate([np.zeros(100), np.ones(5000), np.full(100, 2)]).astype(np.int64) << 24
    lengths = np.diff([0] + runs.cuts(keys, 1000, final=True) + [len(keys)])
    assert len(lengths) == 5 and lengths.max() <= 1100


def test_row_group_rows_keeps_a_small_footer_within_the_first_read():
    per_group = 1200
    # 3 bands of 360k rows, 2.2 MB in all: the cheapest count keeps the footer under 64 KiB
    rows = runs.row_group_rows([360_000] * 3, 2.2e6, per_group, 2000)
    groups = 3 * -(-360_000 // rows)
    assert 2000 + groups * per_group <= runs.TAIL_READ and groups > 30
    # ten times the data: the footer no longer fits anyway; more, smaller groups
    big = runs.row_group_rows([3_600_000] * 3, 22e6, per_group, 2000)
    assert 3 * 3_600_000 // big > 3 * groups


@pytest.mark.parametrize("where", ["memory", "disk", "disk-compressed"])
def test_seal_writes_the_complete_documents_and_keeps_the_rest(tmp_path, monkeypatch, where):
    from attnpipe.store import writer as writer_module

    monkeypatch.setattr(runs, "BATCH_ROWS", 64)
    if where == "disk-compressed":  # past the raw limit, a stretch's runs go to LZ4 files
        monkeypatch.setattr(writer_module, "SPILL_RAW_BYTES", 4000)
    rng = np.random.default_rng(5)
    ids = [f"d{i:03d}" for i in range(50)]
    with ShardWriter(tmp_path, 0, "a", {}, heads=HEADS, flush_rows=500,
                     buffer_bytes=4 << 20 if where == "memory" else 4) as w:
        w.doc_ids = ids
        w.recipes = {0: ("topk", '{"k":3,"per_head":true}')}
        written = []
        for part in np.array_split(rng.permutation(50), 8):
            t = edge_rows(rng, np.sort(part))
            written.append(t)
            w.write_batch("edges", {c: t.column(c).to_numpy() for c in t.column_names}, layer=0, recipe=0)
        table_writer = next(iter(w.writers.values()))
        files = table_writer.spilled + [table_writer.spill]
        assert [f.compress for f in files] == [False] + [True] * (len(files) - 1)
        assert bool(table_writer.spilled) == (where == "disk-compressed")
        assert (w.staging / "_runs").exists() == (where != "memory")
        w.seal(20)  # documents 0..19 are complete
        w.wait_sealed()
        sealed = table_writer.rows_in_file
        files = w.finalize()
        assert not (w.staging / "_runs").exists()
        got = pq.read_table(w.staging / files[0].path)
    expect = reference(pa.concat_tables(written))
    assert got.num_rows == expect.num_rows == files[0].rows
    doc = pa.array(ids).take(expect.column("doc_index"))
    key = list(zip(got.column("doc_id").to_pylist(), got.column("window_index").to_pylist(),
                   got.column("head").to_pylist(), got.column("query_pos").to_pylist(),
                   got.column("key_pos").to_pylist(), got.column("weight").to_pylist()))
    want = list(zip(doc.to_pylist(), *(expect.column(c).to_pylist() for c in ORDER[1:]),
                    [float(np.float32(x)) for x in _bf16(expect.column("weight"))]))
    assert sorted(key) == sorted(want)
    # the first seal wrote exactly the rows of documents 0..19, ahead of the rest
    assert sealed == int(np.sum(expect.column("doc_index").to_numpy() < 20))
    assert set(got.column("doc_id").to_pylist()[:sealed]) == set(ids[:20])


def _bf16(column) -> list[float]:
    from attnpipe.store.writer import round_bfloat16
    return round_bfloat16(column.to_numpy()).tolist()


def test_runs_stay_in_memory_within_the_budget(tmp_path):
    """A shard whose runs fit the budget never writes a spill file; past it, the file takes them
    all, in order, and the budget comes back when the runs are removed."""
    rng = np.random.default_rng(6)
    tables = [edge_rows(rng, np.sort(part)) for part in np.array_split(rng.permutation(30), 4)]
    expect = reference(pa.concat_tables(tables))
    for free in (1 << 30, 3000):
        budget = runs.Budget(free)
        spill = runs.SpillFile(tmp_path / f"m{free}.arrow", tables[0].schema, budget)
        for t in tables:
            spill.add_run(*runs.sort_run(t, runs.sort_keys(t, HEADS), ORDER))
        spill.close_writer()
        assert spill.path.exists() == (free == 3000)
        assert merged(spill.segments).equals(expect)
        spill.remove()
        assert budget.free == free and not spill.path.exists()
