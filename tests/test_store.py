"""The storage engine (format 2, schema v2) on tiny models: the readers users rely on, commit
records, clean-up of what killed attempts leave, foreign files, `attnpipe verify`, damaged
shards, the output lock, job fingerprints and versions, changed inputs, doc ids, format-1
folders, unwritable outputs, row groups and the storage precision knob."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from attnpipe.corpus import Corpus, open_corpus
from attnpipe.errors import CorpusError, OutputError
from attnpipe.executor.local import run_job
from attnpipe.inspect import open_table
from attnpipe.job import CorpusSpec, RunSpec, load_job
from attnpipe.store import committed_files, read_records

from conftest import error_line, invoke, tiny_model, write_job

TEXTS = ["The animal didn't cross the street because it was too tired.", "Why do cats purr?",
         "Rain fell all night; by morning the road was a river.", "Short.",
         "Glass was expensive, and large windows let out precious heat.", "The mill stood by the river."]
TOPK = '[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 2\n'


@pytest.fixture(autouse=True)
def plain_logger():
    """The CLI points logger 'attnpipe' at stderr and stops propagation; caplog needs it back."""
    log = logging.getLogger("attnpipe")
    saved = log.handlers[:], log.propagate, log.level
    log.handlers[:], log.propagate = [], True
    log.setLevel(logging.INFO)
    yield
    log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]


def corpus_file(tmp_path: Path, texts=TEXTS, ids: list | None = None) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": t} if ids is None else {"text": t, "id": i} for t, i in zip(texts, ids or texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_job(tmp_path, model, recipes=TOPK, ids=False, **run) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        corpus_file(tmp_path, ids=[f"d{i}" for i in range(len(TEXTS))] if ids else None)
    return write_job(tmp_path, corpus, model, recipes=recipes, extra='id_column = "id"' if ids else "",
                     device="cpu", **run)


def run(job: Path, **kw):
    return run_job(load_job(job), quiet=True, **kw)




def stamps(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in committed_files(out)}


def rows(out: Path, table: str) -> list[dict]:
    data = open_table(out, table).to_table()
    keys = [c for c in ("doc_id", "window_index", "layer", "head", "query_pos", "key_pos", "position")
            if c in data.column_names]
    return data.sort_by([(k, "ascending") for k in keys]).to_pylist()


def counts(values) -> dict:
    values = [int(v) for v in values]
    return {v: values.count(v) for v in sorted(set(values))}


def write_lock(out: Path, host: str, pid: int) -> Path:
    lock = out / "_lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "run_id": "feedface0000", "started": "earlier"}) + "\n")
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def done(tmp_path, tiny_model_dir):
    """A finished 2-shard run (head_stats + per-head topk): (job file, output folder)."""
    job = make_job(tmp_path, tiny_model_dir("bert"), num_shards=2)
    summary = run(job)
    assert summary.shards_run == [0, 1]
    return job, summary.output


# --- readers ---------------------------------------------------------------------------------

def test_every_documented_reader_sees_layer(done):
    import datasets
    import pandas as pd

    pl = pytest.importorskip("polars")
    _, out = done
    for table in ("head_stats", "edges"):
        folder, pattern = out / table, str(out / table / "**" / "*.parquet")
        want = counts(open_table(out, table).to_table(columns=["layer"]).column("layer").to_pylist())
        assert set(want) == {0, 1} and all(want.values())
        assert pads.dataset(folder, format="parquet").schema.field("layer").type == pa.int16()

        readers = {
            "pyarrow.dataset": lambda: pads.dataset(folder, format="parquet").to_table(columns=["layer"])
            .column("layer").to_pylist(),
            "pandas": lambda: pd.read_parquet(folder)["layer"].tolist(),
            "polars": lambda: pl.read_parquet(pattern)["layer"].to_list(),
            "duckdb": lambda: [r[0] for r in duckdb.sql(f"select layer from read_parquet('{pattern}')").fetchall()],
            "datasets": lambda: datasets.load_dataset("parquet", data_files=pattern, split="train")["layer"],
        }
        for name, read in readers.items():
            assert counts(read()) == want, f"{name} on {table}"


# --- commit records and the manifest ---------------------------------------------------------

def test_commit_records_list_the_files(done):
    _, out = done
    records = read_records(out)
    assert set(records) == {0, 1}
    listed = []
    for shard, record in records.items():
        path = out / "_commits" / f"shard-{shard:05d}.json"
        assert json.loads(path.read_text()) == record and record["shard"] == shard
        by_table: dict[str, int] = {}
        for f in record["files"]:
            p = out / f["path"]
            assert p.is_file() and f"shard-{shard:05d}-{record['attempt']}" in p.name
            assert f["bytes"] == p.stat().st_size
            assert f["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
            assert f["rows"] == pq.read_metadata(p).num_rows
            by_table[f["table"]] = by_table.get(f["table"], 0) + f["rows"]
            listed.append(p)
        assert record["rows"] == by_table
    on_disk = [p for t in ("documents", "tokens", "words", "head_stats", "edges") for p in (out / t).rglob("*.parquet")]
    assert sorted(committed_files(out)) == sorted(listed) == sorted(on_disk)
    assert sorted(committed_files(out, "edges")) == sorted(p for p in listed if p.is_relative_to(out / "edges"))
    printed = invoke("files", out, "edges")
    assert printed.exit_code == 0 and sorted(printed.output.split()) == sorted(map(str, committed_files(out, "edges")))

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["committed"] == "2/2"
    for key in ("documents", "empty_documents", "windows", "tokens"):
        assert manifest["totals"][key] == sum(r[key] for r in records.values()), key
    tables = {t for r in records.values() for t in r["rows"]}
    assert manifest["totals"]["rows"] == {t: sum(r["rows"].get(t, 0) for r in records.values()) for t in sorted(tables)}
    assert manifest["totals"]["documents"] == len(TEXTS)
    info = json.loads((out / "_dataset.json").read_text())
    assert manifest["job_fingerprint"] == info["job_fingerprint"] == records[0]["job_fingerprint"]


# --- leftovers, foreign files, verify ----------------------------------------------------------

def test_uncommitted_leftovers_are_removed(done):
    job, out = done
    before = stamps(out)
    staged = out / "_staging" / "shard-00001-deadbeef" / "edges" / "layer-000" / "shard-00001-deadbeef-r1-0.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"half a file")
    leftovers = [out / "documents" / "shard-00000-deadbeef-0.parquet",
                 out / "edges" / "layer-001" / "shard-00001-deadbeef-r1-0.parquet"]
    for p in leftovers:
        p.write_bytes(b"not committed")
    report = invoke("verify", out)
    assert report.exit_code == 1 and "left by an uncommitted attempt" in report.output
    summary = run(job)
    assert summary.shards_run == [] and summary.shards_skipped == [0, 1]
    assert not any(p.exists() for p in leftovers)
    assert not (out / "_staging").exists()
    assert stamps(out) == before
    assert invoke("verify", out).exit_code == 0


def test_foreign_file_left_alone_but_reported(done, caplog):
    job, out = done
    edges = committed_files(out, "edges")
    backup = out / "edges" / "backup.parquet"
    shutil.copy(edges[0], backup)
    content = backup.read_bytes()
    with caplog.at_level(logging.WARNING, logger="attnpipe"):
        summary = run(job)
    assert summary.shards_run == []
    assert any("stray file edges/backup.parquet" in r.getMessage() for r in caplog.records), caplog.text
    assert backup.read_bytes() == content
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    assert "warning: stray file edges/backup.parquet" in result.stderr
    assert backup.read_bytes() == content

    data = json.loads(invoke("inspect", out, "--json").output)
    assert data["tables"]["edges"]["files"] == len(edges)
    assert data["tables"]["edges"]["rows"] == sum(pq.read_metadata(p).num_rows for p in edges)
    report = invoke("verify", out)
    assert report.exit_code == 1
    assert "edges/backup.parquet" in report.output and "not written by attnpipe" in report.output


def test_verify_passes_on_a_clean_run(done):
    _, out = done
    result = invoke("verify", out)
    assert result.exit_code == 0, result.output
    assert f"{len(committed_files(out))} committed files checked, 0 damaged, 0 stray" in result.output


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_verify_names_a_damaged_file(done, damage):
    _, out = done
    victim = committed_files(out, "edges")[-1]
    data = victim.read_bytes()
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        victim.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    result = invoke("verify", out)
    assert result.exit_code == 1, result.output
    damaged = [line for line in result.output.splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 1 and str(victim.relative_to(out)) in damaged[0], result.output


def test_deleted_committed_file_redoes_only_its_shard(done, caplog):
    job, out = done
    original = {t: rows(out, t) for t in ("documents", "tokens", "head_stats", "edges")}
    shard0 = {p: p.stat().st_mtime_ns for p in committed_files(out) if "shard-00000-" in p.name}
    victim = next(p for p in committed_files(out, "edges") if "shard-00001-" in p.name)
    victim.unlink()
    with caplog.at_level(logging.WARNING, logger="attnpipe"):
        summary = run(job)
    assert summary.shards_run == [1] and summary.shards_skipped == [0]
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "shard 1" in warning and str(victim.relative_to(out)) in warning
    assert {p: p.stat().st_mtime_ns for p in shard0} == shard0
    assert {t: rows(out, t) for t in original} == original
    assert invoke("verify", out).exit_code == 0


# --- the output lock ---------------------------------------------------------------------------

def test_live_lock_refuses_the_run(done):
    job, out = done
    host, pid = socket.gethostname(), os.getppid()
    lock = write_lock(out, host, pid)
    before = stamps(out)
    with pytest.raises(OutputError) as info:
        run(job)
    message = str(info.value)
    assert f"host {host}" in message and f"pid {pid}" in message and "another run" in message
    assert lock.is_file() and json.loads(lock.read_text())["pid"] == pid  # not ours to remove
    assert stamps(out) == before


def test_live_lock_on_a_folder_with_nothing_committed_yet(tmp_path, tiny_model_dir):
    """A run that has only taken its lock (model still loading): a second run names the holder."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        job = make_job(tmp_path, tiny_model_dir("bert"))
        out = tmp_path / "out"
        out.mkdir()
        write_lock(out, socket.gethostname(), sleeper.pid)
        with pytest.raises(OutputError, match=f"pid {sleeper.pid}"):
            run(job)
        assert (out / "_lock").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_a_dead_process_is_taken_over(done, caplog):
    job, out = done
    pid = dead_pid()
    write_lock(out, socket.gethostname(), pid)
    (out / "_commits" / "shard-00001.json").unlink()  # something to do
    with caplog.at_level(logging.WARNING, logger="attnpipe"):
        summary = run(job)
    assert summary.shards_run == [1]
    assert any("took over the lock" in r.getMessage() and f"pid {pid}" in r.getMessage() for r in caplog.records)
    assert not (out / "_lock").exists()


def test_lock_of_another_host_taken_over_only_after_the_lease(done, caplog):
    job, out = done
    lock = write_lock(out, "another-host.invalid", 4242)
    with pytest.raises(OutputError, match="another-host.invalid"):
        run(job)  # fresh: its holder may be alive, and attnpipe cannot ask another host
    lease = load_job(job).run.lock_lease
    old = time.time() - lease - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="attnpipe"):
        summary = run(job)
    assert summary.shards_skipped == [0, 1]
    assert any("took over the lock" in r.getMessage() and "another-host.invalid" in r.getMessage()
               for r in caplog.records)
    assert not lock.exists()


def test_lock_removed_at_the_end_of_a_run(done):
    _, out = done
    assert not (out / "_lock").exists()
    assert not any(p.name.startswith("_lock") for p in out.iterdir())


# --- fingerprints and versions -----------------------------------------------------------------

def test_changed_job_refused_then_new_run_writes_v2(tmp_path, tiny_model_dir):
    model = tiny_model_dir("bert")
    original = load_job(make_job(tmp_path, model))
    changed = load_job(make_job(tmp_path, model, recipes=TOPK.replace("k = 2", "k = 3")))
    assert original.fingerprint() != changed.fingerprint()
    out = run_job(original, quiet=True).output
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputError) as info:
        run_job(changed, quiet=True)
    message = str(info.value)
    assert "recipes[1].k: 2 -> 3" in message and "--new-run" in message and str(out / "v2") in message

    second = run_job(changed, quiet=True, new_run=True)
    assert second.output == out / "v2" and second.shards_run == [0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and out / "v2" not in p.parents} == before
    assert json.loads((out / "v2" / "_dataset.json").read_text())["job_fingerprint"] == changed.fingerprint()
    params = open_table(out / "v2", "edges").to_table(columns=["recipe_params"]).column("recipe_params")
    assert {json.loads(p)["k"] for p in params.unique().to_pylist()} == {3}

    again = run_job(changed, quiet=True)  # no --new-run: finds the version with its fingerprint
    assert again.output == out / "v2" and again.shards_run == [] and again.shards_skipped == [0]
    first_again = run_job(original, quiet=True)
    assert first_again.output == out and first_again.shards_run == []
    assert str(out / "v2") in invoke("inspect", out).output


def test_relative_and_absolute_job_path_same_fingerprint(tmp_path, tiny_model_dir, monkeypatch):
    corpus_file(tmp_path)
    write_job(tmp_path, "corpus.jsonl", tiny_model_dir("bert"), recipes=TOPK, device="cpu")
    monkeypatch.chdir(tmp_path)
    relative = load_job("job.toml")
    fingerprint = relative.fingerprint()
    assert run_job(relative, quiet=True).shards_run == [0]
    absolute = load_job(tmp_path / "job.toml")
    assert absolute.fingerprint() == fingerprint
    assert run_job(absolute, quiet=True).shards_skipped == [0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from_elsewhere = load_job("../job.toml")
    assert from_elsewhere.fingerprint() == fingerprint
    assert run_job(from_elsewhere, quiet=True).shards_skipped == [0]


@pytest.mark.parametrize("existing", [False, True], ids=["created-by-run", "made-beforehand"])
def test_failed_first_run_does_not_block_a_corrected_job(tmp_path, tiny_model_dir, monkeypatch, existing):
    model = tiny_model_dir("bert")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    bad = make_job(tmp_path, model, recipes=TOPK.replace("k = 2", "k = 5"))

    def broken(*args, **kwargs):
        raise RuntimeError("the first run dies before committing anything")

    monkeypatch.setattr("attnpipe.shard.reduce_batch_async", broken)
    with pytest.raises(RuntimeError):
        run(bad)
    monkeypatch.undo()
    assert out.exists() == existing  # a folder the run made and committed nothing to is removed
    if existing:
        assert not read_records(out) and not (out / "_lock").exists()
    good = make_job(tmp_path, model)
    summary = run(good)
    assert summary.output == out and summary.shards_run == [0]
    assert json.loads((out / "_dataset.json").read_text())["job_fingerprint"] == load_job(good).fingerprint()


# --- changed inputs ------------------------------------------------------------------------------

def test_corpus_changed_in_place_is_refused(tmp_path, tiny_model_dir):
    job = make_job(tmp_path, tiny_model_dir("bert"), ids=True, num_shards=2)
    out = run(job).output
    before = stamps(out)
    lines = (tmp_path / "corpus.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"text": "An edited text.", "id": "d4"})  # row 4 is in shard 1
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(OutputError) as info:
        run(job)
    message = str(info.value)
    assert "corpus changed" in message and "shard 1" in message and "--new-run" in message
    assert stamps(out) == before and not (out / "_lock").exists()
    assert run(job, new_run=True).output == out / "v2"
    resumed = run(job)  # without --new-run: the latest version of this job, whose inputs match
    assert resumed.output == out / "v2" and resumed.shards_skipped == [0, 1]


def test_model_weights_replaced_is_refused(tmp_path, tiny_model_dir, tokenizer):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), model)
    job = make_job(tmp_path, model, num_shards=2)
    out = run(job).output
    (out / "_commits" / "shard-00001.json").unlink()  # shard 1 still to do
    tiny_model("bert", seed=1).save_pretrained(model)
    with pytest.raises(OutputError) as info:
        run(job)
    message = str(info.value)
    assert "weights changed" in message and "shard 0" in message and "--new-run" in message
    assert set(read_records(out)) == {0}
    assert run(job, new_run=True).output == out / "v2"


# --- doc ids ---------------------------------------------------------------------------------------

def test_repeated_texts_get_suffixes_stable_under_appending(tmp_path, tiny_model_dir, caplog):
    texts = ["Same text.", "Other text.", "Same text.", "Same text.", "Third text."]
    spec = CorpusSpec(path="corpus.jsonl")
    corpus_file(tmp_path, texts)
    ids = Corpus(open_corpus(spec, tmp_path), spec).doc_ids
    sha = hashlib.sha1(b"Same text.").hexdigest()[:16]
    assert ids[0] == sha and ids[2] == f"{sha}-2" and ids[3] == f"{sha}-3"
    assert len(set(ids)) == len(ids)
    corpus_file(tmp_path, texts + ["Same text.", "New text."])
    longer = Corpus(open_corpus(spec, tmp_path), spec)
    assert longer.doc_ids[: len(texts)] == ids and longer.doc_ids[5] == f"{sha}-4"
    assert longer.occurrence.tolist() == [1, 1, 2, 3, 1, 4, 1]

    corpus_file(tmp_path, texts)
    with caplog.at_level(logging.INFO, logger="attnpipe"):
        summary = run(write_job(tmp_path, tmp_path / "corpus.jsonl", tiny_model_dir("bert"), device="cpu"))
    assert summary.repeated_texts == 2 and "2 documents repeat the text" in caplog.text
    docs = {d["doc_id"]: d for d in rows(summary.output, "documents")}
    assert sorted(docs) == sorted(ids)
    assert [docs[i]["occurrence"] for i in ids] == [1, 1, 2, 3, 1]
    assert [docs[i]["corpus_row"] for i in ids] == list(range(5))
    assert {d["doc_id"] for d in rows(summary.output, "tokens")} == set(ids)


@pytest.mark.parametrize("ids, expected", [
    (["a", "b", "a", "c"], ["'a'", "rows 0 and 2"]),
    (["a", None, "c", "d"], ["row 1", "no id"]),
])
def test_bad_id_column_refused(tmp_path, tiny_model_dir, ids, expected):
    corpus_file(tmp_path, TEXTS[: len(ids)], ids)
    job = write_job(tmp_path, tmp_path / "corpus.jsonl", tiny_model_dir("bert"), extra='id_column = "id"')
    with pytest.raises(CorpusError) as info:
        run(job)
    for part in expected:
        assert part in str(info.value)
    assert not (tmp_path / "out").exists()


# --- format-1 folders and unwritable outputs -----------------------------------------------------

def test_format_1_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    (out / "head_stats" / "layer=0").mkdir(parents=True)
    (out / "_manifest.json").write_text(json.dumps({"format_version": 1, "status": "complete", "shards": {}}))
    old = out / "head_stats" / "layer=0" / "shard-00000.parquet"
    pq.write_table(pa.table({"doc_id": ["x"], "n_tokens": [3]}), old)
    job = make_job(tmp_path, tiny_model_dir("bert"))
    for args in (("inspect", out), ("run", job), ("verify", out)):
        line = error_line(invoke(*args))
        assert "format 1" in line, args
    result = invoke("run", job, "--new-run")
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'v2'}" in result.output
    assert old.is_file() and pq.read_table(old).num_rows == 1
    assert invoke("verify", out / "v2").exit_code == 0


def test_output_path_is_a_file(tmp_path, tiny_model_dir):
    target = tmp_path / "out"
    target.write_text("not a folder")
    line = error_line(invoke("run", make_job(tmp_path, tiny_model_dir("bert"))))
    assert "is a file" in line and str(target) in line
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores file permissions; test_write_error_is_one_line covers the error path")
def test_read_only_output_folder(tmp_path, tiny_model_dir):
    parent = tmp_path / "ro"
    parent.mkdir()
    job = make_job(tmp_path, tiny_model_dir("bert"), output=str(parent / "out"))
    parent.chmod(0o555)
    try:
        line = error_line(invoke("run", job))
    finally:
        parent.chmod(0o755)
    assert "cannot write" in line and str(parent / "out") in line


def test_write_error_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """A write refused by the OS (read-only folder, full disk) mid-run: one line, nothing left."""
    job = make_job(tmp_path, tiny_model_dir("bert"))

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.staging))

    monkeypatch.setattr("attnpipe.store.writer.ShardWriter.__enter__", refuse)
    line = error_line(invoke("run", job))
    assert "cannot write to" in line and "Permission denied" in line and str(tmp_path / "out") in line
    assert not (tmp_path / "out").exists()


# --- row groups and storage precision --------------------------------------------------------------

@pytest.mark.parametrize("flush_rows", [None, 50], ids=["one-flush", "many-flushes"])
def test_row_groups_hold_one_band_of_heads_and_a_run_of_documents(tmp_path, tiny_model_dir, monkeypatch, flush_rows):
    """The tiny BERT's 4 heads fall into 3 bands ({0, 1}, {2}, {3}); a row group never mixes bands,
    is sorted, and the row groups of one band cover disjoint runs of documents (a document cut
    across two row groups is the only shared value), so a one-document filter skips the rest."""
    from attnpipe.store.writer import ShardWriter

    if flush_rows:
        monkeypatch.setitem(ShardWriter.__init__.__kwdefaults__, "flush_rows", flush_rows)
    out = run(make_job(tmp_path, tiny_model_dir("bert"), batch_tokens=64)).output
    files = committed_files(out, "edges")
    assert files
    bands = {0: 0, 1: 0, 2: 1, 3: 2}
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.to_arrow_schema().names
        head, doc = names.index("head"), names.index("doc_id")
        ranges: dict[int, list] = {}
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(head).statistics
            assert bands[stats.min] == bands[stats.max], f"{f} row group {i} mixes bands of heads"
            d = meta.row_group(i).column(doc).statistics
            ranges.setdefault(bands[stats.min], []).append((d.min, d.max))
            group = pq.ParquetFile(f).read_row_group(i).to_pydict()
            order = list(zip(group["doc_id"], group["window_index"], group["head"], group["query_pos"],
                             group["key_pos"]))
            assert order == sorted(order), f"{f} row group {i} is not sorted"
        assert sorted(ranges) == [0, 1, 2]
        for band, spans in ranges.items():
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"{f} band {band}: {spans}"


def test_weight_dtype(tmp_path, tiny_model_dir):
    recipes = TOPK + '[[recipes]]\nname = "dense"\nmax_tokens = 64\n'
    model = tiny_model_dir("bert")
    expected = {"float16": pa.float16(), "float32": pa.float32(), "bfloat16": pa.float32()}
    default = RunSpec().weight_dtype
    fingerprints = {}
    for dtype in ("float16", "float32", None):
        folder = tmp_path / str(dtype)
        folder.mkdir()
        job = make_job(folder, model, recipes=recipes, **({"weight_dtype": dtype} if dtype else {}))
        fingerprints[dtype] = load_job(job).fingerprint()
        out = run(job).output
        want = expected[dtype or default]
        edges = open_table(out, "edges").to_table()
        maps = open_table(out, "maps").to_table()
        assert edges.schema.field("weight").type == want, dtype
        assert maps.schema.field("weights").type == pa.list_(want), dtype
        if dtype is None and default == "bfloat16":  # float32 values rounded to 8 significant bits
            bits = edges.column("weight").to_numpy().astype(np.float32).view(np.uint32)
            assert (bits & 0xFFFF == 0).all()
        assert invoke("verify", out).exit_code == 0, dtype
    assert fingerprints["float16"] != fingerprints["float32"]
    if default in fingerprints:  # the default spelled out is the same job
        assert fingerprints[None] == fingerprints[default]
    else:
        assert len(set(fingerprints.values())) == 3
