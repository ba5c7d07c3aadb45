"""End to end on a tiny model: the Parquet tables, their schemas and partitions, the readers
users rely on, windows on long documents, padding never leaking, and safe reruns."""

from __future__ import annotations

import json
import os

import duckdb
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import reduce as reduce_module
from pipeline.executor.local import run_job
from pipeline.job import load_job
from pipeline.store.schema import load_schemas

from conftest import write_job

ALL_RECIPES = """
[[recipes]]
name = "head_stats"
[[recipes]]
name = "topk"
k = 3
[[recipes]]
name = "topk"
k = 2
per_head = false
[[recipes]]
name = "threshold"
t = 0.2
[[recipes]]
name = "topp"
p = 0.5
per_head = false
[[recipes]]
name = "rollout"
k = 3
[[recipes]]
name = "dense"
max_tokens = 16
"""
LONG = " ".join(f"Sentence number {i} talks about the river, the hills and the old mill." for i in range(30))
TEXTS = ["The animal didn't cross the street because it was too tired.", "Tiny.", "", LONG,
         "Rain fell all night; by morning the road was a river.", "Why do cats purr?"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "lang": "en"}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def run(tmp_path, corpus, model_dir, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = write_job(tmp_path, corpus, model_dir, recipes=ALL_RECIPES,
                    extra='id_column = "id"\nmetadata_columns = ["lang"]', **kw)
    return run_job(load_job(job), quiet=True), job


def table(out, name):
    return pads.dataset(out / name, format="parquet", partitioning="hive").to_table()


def test_layout_schema_and_provenance(tmp_path, corpus, tiny_model_dir):
    summary, _ = run(tmp_path, corpus, tiny_model_dir("bert"), num_shards=2)
    out = summary.output
    schemas = load_schemas()
    for name, schema in schemas.items():
        files = sorted((out / name).rglob("*.parquet"))
        expected = {f"shard-0000{s}.parquet" for s in (0, 1)}
        assert {f.name for f in files} == expected
        if schema.partitioned:
            assert {f.parent.name for f in files} == {"layer=0", "layer=1"}
        for f in files:
            meta = pq.read_metadata(f)
            assert meta.row_group(0).column(0).compression == "ZSTD"
            arrow = pq.read_schema(f)
            declared = schema.arrow()
            assert arrow.names[: len(declared)] == declared.names
            assert arrow.metadata[b"attnpipe.schema_version"] == str(schema.version).encode()
            prov = json.loads(arrow.metadata[b"attnpipe.provenance"])
            assert prov["num_layers"] == 2 and prov["recipes"]["topk"] >= 1 and "torch" in prov["versions"]
            data = pq.read_table(f)
            keys = [c for c in schema.sort_by if c in data.column_names]
            assert data.sort_by([(k, "ascending") for k in keys]).equals(data), f"{f} is not sorted"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["shards"]) == {"0", "1"}
    assert manifest["shards"]["0"]["rows"]["edges"] == pq.ParquetDataset(
        [str(f) for f in (out / "edges").rglob("shard-00000.parquet")]).read().num_rows
    docs = table(out, "documents").to_pandas().set_index("doc_id")
    assert docs.loc["d2", "empty"] and docs.loc["d2", "windows"] == 0
    assert list(docs["lang"].unique()) == ["en"]
    assert not (out / "_staging").exists()


def test_readers_pyarrow_pandas_duckdb_datasets(tmp_path, corpus, tiny_model_dir):
    import datasets
    import pandas as pd

    summary, _ = run(tmp_path, corpus, tiny_model_dir("bert"))
    out = summary.output
    n = table(out, "edges").num_rows
    assert len(pd.read_parquet(out / "edges")) == n
    sql = f"select count(*) from read_parquet('{out}/edges/**/*.parquet', hive_partitioning=true)"
    assert duckdb.sql(sql).fetchall()[0][0] == n
    by_layer = duckdb.sql(f"select layer, count(*) from read_parquet('{out}/head_stats/**/*.parquet', "
                          "hive_partitioning=true) group by layer order by layer").fetchall()
    assert [r[0] for r in by_layer] == [0, 1]
    ds = datasets.load_dataset("parquet", data_files=str(out / "edges" / "**" / "*.parquet"), split="train")
    assert len(ds) == n


def test_long_document_is_windowed_not_truncated(tmp_path, corpus, tiny_model_dir, tokenizer):
    summary, _ = run(tmp_path, corpus, tiny_model_dir("bert"))
    tokens = table(summary.output, "tokens").to_pandas()
    long = tokens[tokens.doc_id == "d3"]
    assert long.window.nunique() > 3
    assert long.groupby("window").position.max().max() == 63  # max_length 64
    # Every content token of the full document is covered, in order, with correct offsets.
    full = tokenizer(LONG, add_special_tokens=False, return_offsets_mapping=True)
    covered = {(s, e) for s, e, sp in zip(long.char_start, long.char_end, long.special) if not sp}
    assert covered == {tuple(o) for o in full["offset_mapping"]}
    docs = table(summary.output, "documents").to_pandas().set_index("doc_id")
    assert docs.loc["d3", "n_tokens"] == len(full["input_ids"])
    first, second = (long[(long.window == w) & ~long.special] for w in (0, 1))
    assert list(first.token_id[-8:]) == list(second.token_id[:8])  # stride = 8 tokens of overlap


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_padding_and_future_never_stored(tmp_path, corpus, tiny_model_dir, arch):
    summary, _ = run(tmp_path, corpus, tiny_model_dir(arch), batch_tokens=512)
    out = summary.output
    lengths = duckdb.sql(f'select doc_id, "window", count(*) as n from read_parquet(\'{out}/tokens/*.parquet\') '
                         "group by all").df()  # window is an SQL keyword: quote it
    causal = arch == "gpt2"
    for name in ("edges", "rollout", "maps"):
        data = table(out, name).to_pandas().merge(lengths, on=["doc_id", "window"], how="left")
        assert data.n.notna().all()
        assert (data.query_pos < data.n).all()
        if "key_pos" in data:
            assert (data.key_pos < data.n).all()
            if causal:
                assert (data.key_pos <= data.query_pos).all()
        if name == "maps":
            sizes = data.weights.map(len)
            assert (sizes == (data.query_pos + 1 if causal else data.n)).all()


def test_rerun_skips_finished_shards(tmp_path, corpus, tiny_model_dir):
    first, job = run(tmp_path, corpus, tiny_model_dir("bert"), num_shards=3)
    stamp = {f: f.stat().st_mtime_ns for f in first.output.rglob("*.parquet")}
    again = run_job(load_job(job), quiet=True)
    assert again.shards_run == [] and again.shards_skipped == [0, 1, 2]
    assert {f: f.stat().st_mtime_ns for f in first.output.rglob("*.parquet")} == stamp


def test_crash_mid_shard_leaves_nothing_that_looks_complete(tmp_path, corpus, tiny_model_dir, monkeypatch):
    calls = {"n": 0}
    real = reduce_module.reduce_batch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated worker crash")
        return real(*args, **kwargs)

    monkeypatch.setattr("pipeline.shard.reduce_batch", flaky)
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), recipes=ALL_RECIPES, num_shards=2, batch_tokens=64)
    with pytest.raises(RuntimeError):
        run_job(load_job(job), quiet=True)
    out = tmp_path / "out"
    manifest = json.loads((out / "_manifest.json").read_text())
    done = {f"shard-{int(s):05d}" for s in manifest["shards"]}
    assert manifest["status"] == "running"
    assert {f.stem for f in out.rglob("*.parquet")} <= done
    assert not (out / "_staging").exists()
    # A leftover file of an unrecorded shard (crash between renames) is removed on the next run.
    stray = out / "edges" / "layer=0" / "shard-00001.parquet"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"partial")
    monkeypatch.setattr("pipeline.shard.reduce_batch", real)
    summary = run_job(load_job(job), quiet=True)
    assert sorted(summary.shards_run + summary.shards_skipped) == [0, 1]
    assert pq.read_metadata(stray).num_rows >= 0  # rewritten as a real Parquet file


def test_same_job_same_data(tmp_path, corpus, tiny_model_dir):
    a, _ = run(tmp_path / "a", corpus, tiny_model_dir("llama"), num_shards=2)
    b, _ = run(tmp_path / "b", corpus, tiny_model_dir("llama"), num_shards=2, batch_tokens=128)
    for name in ("documents", "tokens", "edges", "rollout", "head_stats"):
        ta, tb = table(a.output, name), table(b.output, name)
        keys = [(c, "ascending") for c in load_schemas()[name].sort_by] + (
            [("layer", "ascending")] if "layer" in ta.column_names else [])
        ta, tb = ta.sort_by(keys), tb.sort_by(keys)
        assert ta.num_rows == tb.num_rows
        for col in ta.column_names:
            if col in ("weight",) or col.endswith("mass") or col in ("entropy", "entropy_norm", "mean_distance"):
                assert ta[col].to_numpy() == pytest.approx(tb[col].to_numpy(), abs=1e-5)
            else:
                assert ta[col].to_pylist() == tb[col].to_pylist(), col
