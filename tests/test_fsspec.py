"""Outputs at fsspec URLs: the whole commit protocol on fsspec's memory filesystem, with the
in-process executor and with Dask workers (threads, which share the memory filesystem)."""

from __future__ import annotations

import json
import logging

import fsspec
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from attnpipe.cli import cli
from attnpipe.errors import OutputError
from attnpipe.executor import run as run_executor
from attnpipe.inspect import summarize
from attnpipe.job import load_job
from attnpipe.store import committed_files, read_records
from attnpipe.store.location import Location
from attnpipe.store.verify import verify

from conftest import write_job

TEXTS = [f"Text {i}: the mill by the river turned {i} times." for i in range(7)]
TABLES = ("documents", "tokens", "head_stats", "edges", "rollout")


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()


def job_file(tmp_path, model, output, **run):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return write_job(tmp_path, corpus, model, recipes="", device="cpu", num_shards=2, output=output, **run)


def rows(files):
    out = {}
    for table in TABLES:
        parts = [pq.read_table(f, filesystem=fs).to_pylist() for f, fs in files(table)]
        out[table] = sorted(json.dumps(r, sort_keys=True, default=str) for p in parts for r in p)
    return out


def local_rows(out):
    return rows(lambda t: [(str(f), None) for f in committed_files(out, t)])


def memory_rows(url, memfs):
    return rows(lambda t: [(f.removeprefix("memory://"), memfs) for f in committed_files(url, t)])


def test_memory_filesystem_output_equals_a_local_one(tmp_path, tiny_model_dir, memfs):
    model = tiny_model_dir("bert")
    local = run_executor(load_job(job_file(tmp_path / "a", model, str(tmp_path / "a" / "out"))), quiet=True).output
    url = "memory://bucket/attn"
    job = load_job(job_file(tmp_path / "b", model, url))
    summary = run_executor(job, quiet=True)
    assert summary.output == url and sorted(summary.shards_run) == [0, 1]
    assert memory_rows(url, memfs) == local_rows(local)
    assert sorted(read_records(url)) == [0, 1] and not memfs.exists("/bucket/attn/_lock")
    assert not memfs.exists("/bucket/attn/_staging")
    assert verify(url).ok
    assert summarize(url)["status"] == "complete"
    assert run_executor(job, quiet=True).shards_run == []  # a rerun skips committed shards
    # A committed file lost on the remote side is noticed and its shard rewritten.
    lost = next(f for f in committed_files(url, "edges"))
    memfs.rm(lost.removeprefix("memory://"))
    assert not verify(url).ok
    assert run_executor(job, quiet=True).shards_run in ([0], [1])
    assert memory_rows(url, memfs) == local_rows(local)


def test_cli_status_verify_and_files_on_a_url(tmp_path, tiny_model_dir, memfs):
    url = "memory://bucket/cli"
    runner = CliRunner()
    # `attnpipe run -o memory://...` is refused (the data would die with the command): write from
    # Python, then read with the CLI in the same process.
    run_executor(load_job(job_file(tmp_path, tiny_model_dir("bert"), url)), quiet=True)
    assert runner.invoke(cli, ["status", url]).exit_code == 0
    assert runner.invoke(cli, ["verify", url]).exit_code == 0
    listed = runner.invoke(cli, ["files", url, "edges"]).output.split()
    assert listed and all(p.startswith("memory://bucket/cli/edges/layer-") for p in listed)


def test_lock_on_a_url_refuses_a_second_run(tmp_path, tiny_model_dir, memfs):
    url = "memory://bucket/locked"
    Location(url).create_exclusive("_lock", json.dumps({"host": "elsewhere", "pid": 1, "run_id": "x",
                                                         "started": "then"}).encode())
    with pytest.raises(OutputError) as info:
        run_executor(load_job(job_file(tmp_path, tiny_model_dir("bert"), url)), quiet=True)
    assert "host elsewhere" in str(info.value)


def test_dask_workers_write_to_a_url(tmp_path, tiny_model_dir, memfs):
    from distributed import LocalCluster

    model = tiny_model_dir("bert")
    local = run_executor(load_job(job_file(tmp_path / "a", model, str(tmp_path / "a" / "out"))), quiet=True).output
    url = "memory://bucket/dask"
    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0", silence_logs=logging.ERROR) as c:
        job = load_job(job_file(tmp_path / "b", model, url, executor="dask", scheduler=c.scheduler_address))
        summary = run_executor(job, quiet=True)
    assert sorted(summary.shards_run) == [0, 1]
    assert memory_rows(url, memfs) == local_rows(local)
    assert verify(url).ok


def test_unknown_protocol_is_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(OutputError) as info:
        run_executor(load_job(job_file(tmp_path, tiny_model_dir("bert"), "nosuchfs://x/y")), quiet=True)
    assert "nosuchfs://x/y" in str(info.value) and "\n" not in str(info.value)
