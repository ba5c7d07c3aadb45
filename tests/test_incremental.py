"""Scheduled runs over a growing corpus: appended rows become new shards, committed shards are
never touched; a corpus changed in place or shrunk is refused with how to start a new run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from attnpipe.errors import OutputError
from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.store import committed_files, read_records
from attnpipe.store.dataset import read_info

from conftest import write_job

TEXTS = [f"Document {i} tells of the river, the hill and mill number {i}." for i in range(9)]


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def run(job):
    return run_job(load_job(job), quiet=True)


def state(out):
    """Everything a committed shard is: its record and the bytes of its files."""
    return {s: (r["attempt"], [(f["path"], f["sha256"]) for f in r["files"]]) for s, r in read_records(out).items()}


@pytest.fixture
def grown(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, TEXTS[:6])
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), num_shards=2, device="cpu")
    first = run(job)
    return tmp_path, corpus, job, first.output


def test_appended_rows_become_new_shards_old_ones_untouched(grown):
    tmp_path, corpus, job, out = grown
    before = state(out)
    mtimes = {p: p.stat().st_mtime_ns for p in committed_files(out)}
    write_corpus(corpus, TEXTS)  # three rows appended
    second = run(job)
    assert second.shards_run == [2] and second.shards_skipped == [0, 1]
    after = state(out)
    assert {s: after[s] for s in before} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    plan = read_info(out)["plan"]
    assert plan["shards"] == [[0, 3], [3, 6], [6, 9]] and plan["corpus_rows"] == 9
    assert read_records(out)[2]["corpus_rows"] == [6, 9]
    docs = [d for f in committed_files(out, "documents") for d in pq.read_table(f).column("doc_id").to_pylist()]
    assert len(docs) == len(set(docs)) == 9
    # Nothing new: nothing to do.
    assert run(job).shards_run == []


def test_same_rows_as_one_run_over_the_whole_corpus(grown, tiny_model_dir):
    tmp_path, corpus, job, out = grown
    write_corpus(corpus, TEXTS)
    run(job)
    whole = tmp_path / "whole"
    whole.mkdir()
    write_corpus(whole / "corpus.jsonl", TEXTS)
    ref = run(write_job(whole, whole / "corpus.jsonl", tiny_model_dir("bert"), num_shards=1, device="cpu")).output

    def rows(folder, table):
        data = [pq.read_table(f).drop_columns(["shard"] if table == "documents" else []).to_pylist()
                for f in committed_files(folder, table)]
        return sorted((json.dumps(r, sort_keys=True, default=str) for part in data for r in part))

    for table in ("documents", "tokens", "head_stats"):
        assert rows(out, table) == rows(ref, table), table


def test_corpus_changed_in_place_is_refused(grown):
    tmp_path, corpus, job, out = grown
    write_corpus(corpus, [TEXTS[0].upper()] + TEXTS[1:7])
    with pytest.raises(OutputError) as info:
        run(job)
    assert "corpus changed since shard 0" in str(info.value) and "--new-run" in str(info.value)


def test_corpus_that_shrank_is_refused(grown):
    tmp_path, corpus, job, out = grown
    write_corpus(corpus, TEXTS[:4])
    with pytest.raises(OutputError) as info:
        run(job)
    assert "--new-run" in str(info.value)
