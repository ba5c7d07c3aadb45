"""End to end on a tiny model: the Parquet tables, their schemas and layer folders, the readers
users rely on, windows on long documents, padding never leaking, and safe reruns."""

from __future__ import annotations

import json

import duckdb
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from attnpipe import reduce as reduce_module
from attnpipe import shard as shard_module
from attnpipe.executor import local as local_executor
from attnpipe.executor.local import run_job
from attnpipe.inspect import open_table
from attnpipe.job import load_job
from attnpipe.store import committed_files, read_records
from attnpipe.store.paths import DATA_FILE
from attnpipe.store.schema import load_schemas

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
    """The committed rows of one table (`layer` is a real column of the layered tables)."""
    return open_table(out, name).to_table()


def test_layout_schema_and_provenance(tmp_path, corpus, tiny_model_dir):
    summary, _ = run(tmp_path, corpus, tiny_model_dir("bert"), num_shards=2)
    out = summary.output
    schemas = load_schemas()
    recipe_names = [line.split('"')[1] for line in ALL_RECIPES.splitlines() if line.startswith("name =")]
    committed = set(committed_files(out))
    for name, schema in schemas.items():
        files = sorted((out / name).rglob("*.parquet"))
        # tables of other run kinds: generate runs, interventions, groups and gradient recipes
        if name in ("generations", "grounding", "effects", "group_mass", "saliency", "saliency_heads"):
            assert not files
            continue
        assert files and set(files) <= committed, name
        matches = [DATA_FILE.match(f.name) for f in files]
        assert all(matches), [f.name for f in files]
        assert {int(m.group(1)) for m in matches} == {0, 1}
        if schema.layer_folders:
            assert {f.parent.name for f in files} == {"layer-000", "layer-001"}
            assert {f.parent.parent for f in files} == {out / name}
        else:
            assert {f.parent for f in files} == {out / name}
        for f, m in zip(files, matches):
            meta = pq.read_metadata(f)
            assert meta.row_group(0).column(0).compression == "ZSTD"
            arrow = pq.read_schema(f)
            declared = schema.arrow()
            assert arrow.names[: len(declared)] == declared.names
            assert arrow.metadata[b"attnpipe.table"] == name.encode()
            assert arrow.metadata[b"attnpipe.schema_version"] == str(schema.version).encode()
            prov = json.loads(arrow.metadata[b"attnpipe.provenance"])
            assert prov["num_layers"] == 2 and prov["recipes"]["topk"] >= 1 and "torch" in prov["versions"]
            data = pq.read_table(f)
            if schema.layer_folders:
                assert data.column("layer").unique().to_pylist() == [int(f.parent.name[len("layer-"):])]
            if m.group(3) is not None:  # -rN: every row comes from the job's recipe N
                recipe = recipe_names[int(m.group(3))]
                assert arrow.metadata[b"attnpipe.recipe"] == recipe.encode()
                assert data.column("recipe").unique().to_pylist() == [recipe]
            keys = [(c, "ascending") for c in schema.sort_by if c in data.column_names]
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                group = pf.read_row_group(i)
                assert group.sort_by(keys).equals(group), f"{f} row group {i} is not sorted"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["shards"]) == {"0", "1"}
    shard0 = [out / f["path"] for f in read_records(out)[0]["files"] if f["table"] == "edges"]
    assert manifest["shards"]["0"]["rows"]["edges"] == pq.ParquetDataset([str(f) for f in shard0]).read().num_rows
    docs = table(out, "documents").to_pandas().set_index("doc_id")
    assert docs.loc["d2", "empty"] and docs.loc["d2", "windows"] == 0
    assert list(docs["lang"].unique()) == ["en"]
    assert sorted(docs["corpus_row"]) == list(range(len(TEXTS)))
    assert not (out / "_staging").exists()
    assert not (out / "_lock").exists()


def test_readers_pyarrow_pandas_duckdb_datasets(tmp_path, corpus, tiny_model_dir):
    import datasets
    import pandas as pd

    summary, _ = run(tmp_path, corpus, tiny_model_dir("bert"))
    out = summary.output
    n = table(out, "edges").num_rows
    assert pads.dataset(out / "edges", format="parquet").count_rows() == n
    assert len(pd.read_parquet(out / "edges")) == n
    sql = f"select count(*) from read_parquet('{out}/edges/**/*.parquet')"
    assert duckdb.sql(sql).fetchall()[0][0] == n
    by_layer = duckdb.sql(f"select layer, count(*) from read_parquet('{out}/head_stats/**/*.parquet') "
                          "group by layer order by layer").fetchall()
    assert [r[0] for r in by_layer] == [0, 1]
    ds = datasets.load_dataset("parquet", data_files=str(out / "edges" / "**" / "*.parquet"), split="train")
    assert len(ds) == n


def test_long_document_is_windowed_not_truncated(tmp_path, corpus, tiny_model_dir, tokenizer):
    summary, _ = run(tmp_path, corpus, tiny_model_dir("bert"))
    tokens = table(summary.output, "tokens").to_pandas()
    long = tokens[tokens.doc_id == "d3"]
    assert long.window_index.nunique() > 3
    assert long.groupby("window_index").position.max().max() == 63  # max_length 64
    # Every content token of the full document is covered, in order, with correct offsets.
    full = tokenizer(LONG, add_special_tokens=False, return_offsets_mapping=True)
    covered = {(s, e) for s, e, sp in zip(long.char_start, long.char_end, long.special) if not sp}
    assert covered == {tuple(o) for o in full["offset_mapping"]}
    docs = table(summary.output, "documents").to_pandas().set_index("doc_id")
    assert docs.loc["d3", "content_tokens"] == len(full["input_ids"])
    assert docs.loc["d3", "windows"] == long.window_index.nunique()
    first, second = (long[(long.window_index == w) & ~long.special] for w in (0, 1))
    assert list(first.token_id[-8:]) == list(second.token_id[:8])  # stride = 8 tokens of overlap


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_padding_and_future_never_stored(tmp_path, corpus, tiny_model_dir, arch):
    summary, _ = run(tmp_path, corpus, tiny_model_dir(arch), batch_tokens=512)
    out = summary.output
    lengths = duckdb.sql(f"select doc_id, window_index, count(*) as n from read_parquet('{out}/tokens/*.parquet') "
                         "group by all").df()
    causal = arch == "gpt2"
    for name in ("edges", "rollout", "maps"):
        data = table(out, name).to_pandas().merge(lengths, on=["doc_id", "window_index"], how="left")
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
    records = {s: r["attempt"] for s, r in read_records(first.output).items()}
    again = run_job(load_job(job), quiet=True)
    assert again.shards_run == [] and again.shards_skipped == [0, 1, 2]
    assert {f: f.stat().st_mtime_ns for f in first.output.rglob("*.parquet")} == stamp
    assert {s: r["attempt"] for s, r in read_records(first.output).items()} == records


def test_crash_mid_shard_leaves_nothing_that_looks_complete(tmp_path, corpus, tiny_model_dir, monkeypatch):
    """Shard 0 commits, shard 1 fails after some of its rows were written: only shard 0 is
    visible, nothing is left in staging, and the rerun does shard 1 only."""
    current = {"shard": None, "calls": 0}
    real_reduce, real_run_shard = reduce_module.reduce_batch_async, shard_module.run_shard

    def tracking(job, shard, *args, **kwargs):
        current["shard"] = getattr(shard, "index", shard)
        return real_run_shard(job, shard, *args, **kwargs)

    def flaky(*args, **kwargs):
        if current["shard"] == 1:
            current["calls"] += 1
            if current["calls"] == 2:
                raise RuntimeError("simulated worker crash")
        return real_reduce(*args, **kwargs)

    monkeypatch.setattr(shard_module, "run_shard", tracking)
    monkeypatch.setattr(local_executor, "run_shard", tracking, raising=False)  # if imported eagerly
    monkeypatch.setattr("attnpipe.shard.reduce_batch_async", flaky)
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), recipes=ALL_RECIPES, num_shards=2, batch_tokens=64)
    with pytest.raises(RuntimeError):
        run_job(load_job(job), quiet=True)
    assert current["calls"] == 2  # shard 1 had written rows of a batch before it failed
    out = tmp_path / "out"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "partial" and set(manifest["shards"]) == {"0"}
    assert set(read_records(out)) == {0}
    assert set(out.rglob("*.parquet")) == set(committed_files(out))
    assert {DATA_FILE.match(f.name).group(1) for f in out.rglob("*.parquet")} == {"00000"}
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
    assert not (out / "_lock").exists()
    # A leftover file of an uncommitted shard (killed between renames) is removed on the next run.
    stray = out / "edges" / "layer-000" / "shard-00001-deadbeef-r1-0.parquet"
    stray.write_bytes(b"partial")
    monkeypatch.setattr("attnpipe.shard.reduce_batch_async", real_reduce)
    summary = run_job(load_job(job), quiet=True)
    assert summary.shards_run == [1] and summary.shards_skipped == [0]
    assert not stray.exists()
    assert set(out.rglob("*.parquet")) == set(committed_files(out))
    for f in committed_files(out):
        assert pq.read_metadata(f).num_rows >= 0
    assert json.loads((out / "_manifest.json").read_text())["status"] == "complete"


def test_same_job_same_data(tmp_path, corpus, tiny_model_dir):
    # float32 storage: the comparison is about batching, not about the rounding of stored values
    a, _ = run(tmp_path / "a", corpus, tiny_model_dir("llama"), num_shards=2, weight_dtype="float32")
    b, _ = run(tmp_path / "b", corpus, tiny_model_dir("llama"), num_shards=2, batch_tokens=128,
               weight_dtype="float32")
    for name in ("documents", "tokens", "edges", "rollout", "head_stats"):
        ta, tb = table(a.output, name), table(b.output, name)
        keys = [(c, "ascending") for c in load_schemas()[name].sort_by] + (
            [("layer", "ascending")] if "layer" in ta.column_names else []) + (
            [("recipe_params", "ascending")] if "recipe_params" in ta.column_names else [])
        ta, tb = ta.sort_by(keys), tb.sort_by(keys)
        assert ta.num_rows == tb.num_rows
        for col in ta.column_names:
            if col in ("weight",) or col.endswith("mass") or col in ("entropy", "entropy_norm", "mean_distance"):
                assert ta[col].to_numpy() == pytest.approx(tb[col].to_numpy(), abs=1e-5)
            else:
                assert ta[col].to_pylist() == tb[col].to_pylist(), col
