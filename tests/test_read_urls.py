"""The read side opens what `run` can write: outputs at fsspec URLs are mirrored into a local
cache (checked against the records) and read like a folder; `run -o memory://` from the command
line is refused, since its data would be gone when the command ends."""

from __future__ import annotations

import json

import fsspec
import pytest
from conftest import invoke, write_job

from attnpipe.errors import ReadError
from attnpipe.executor import run as run_executor
from attnpipe.job import load_job
from attnpipe.read import open_dataset

TEXTS = [f"Text {i}: the mill by the river turned {i} times." for i in range(5)]


@pytest.fixture
def memfs(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    yield fs
    fs.store.clear()


def job_file(tmp_path, model, output):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return write_job(tmp_path, corpus, model, recipes="", device="cpu", num_shards=2, output=output)


def test_cli_run_to_memory_is_refused_before_anything_runs(tmp_path, tiny_model_dir, memfs):
    result = invoke("run", job_file(tmp_path, tiny_model_dir("bert"), "memory://bucket/gone"))
    assert result.exit_code == 1 and "memory://" in result.output and "Traceback" not in result.output
    assert not memfs.exists("/bucket/gone")


def test_url_dataset_reads_like_a_folder(tmp_path, tiny_model_dir, memfs):
    url = "memory://bucket/attn"
    run_executor(load_job(job_file(tmp_path, tiny_model_dir("bert"), url)), quiet=True)
    local = tmp_path / "local"
    run_executor(load_job(job_file(tmp_path, tiny_model_dir("bert"), str(local))), quiet=True)

    remote, here = open_dataset(url), open_dataset(local)
    assert url in repr(remote)
    for table in ("documents", "tokens", "head_stats", "edges", "rollout"):
        cols = [c for c in here.table(table).schema.names if c != "shard"]
        a = remote.to_pandas(table, columns=cols).sort_values(cols[:4], ignore_index=True)
        b = here.to_pandas(table, columns=cols).sort_values(cols[:4], ignore_index=True)
        assert a.equals(b), table
    sql = "SELECT count(*) AS n FROM edges_tokens"
    assert remote.sql(sql).n[0] == here.sql(sql).n[0] > 0

    for command in (["query", url, sql], ["heads", url]):
        result = invoke(*command)
        assert result.exit_code == 0, result.output


def test_url_damage_and_absence_are_one_line(tmp_path, tiny_model_dir, memfs):
    with pytest.raises(ReadError, match="not a folder"):
        open_dataset("memory://bucket/nothing")
    url = "memory://bucket/flip"
    run_executor(load_job(job_file(tmp_path, tiny_model_dir("bert"), url)), quiet=True)
    victim = next(p for p in memfs.find("/bucket/flip") if p.endswith(".parquet"))
    data = bytearray(memfs.cat_file(victim))
    data[len(data) // 2] ^= 0x01
    memfs.pipe_file(victim, bytes(data))
    with pytest.raises(ReadError, match="damaged"):
        open_dataset(url)
