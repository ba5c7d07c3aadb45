"""The Dask executor on a real local cluster of worker processes (CPU, tiny model): the same
rows as the in-process executor, a worker SIGKILLed mid-shard and replaced, a shard that keeps
failing, and an unreachable scheduler."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from attnpipe.cli import cli
from attnpipe.errors import AttnpipeError
from attnpipe.executor import run as run_executor
from attnpipe.job import load_job
from attnpipe.store import committed_files, paths, read_records
from attnpipe.store.verify import verify

from conftest import write_job

distributed = pytest.importorskip("distributed")

TEXTS = [f"Document {i}: the river ran past mill {i}, and the {i} birds sang." for i in range(10)]
TEXTS[3] = " ".join(TEXTS[:8])  # a long one, windowed
RECIPES = ('[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 3\nper_head = true\n'
           '[[recipes]]\nname = "rollout"\nk = 2\n')
TABLES = ("documents", "tokens", "head_stats", "edges", "rollout")


def make_job(folder, model, **run):
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return write_job(folder, corpus, model, recipes=RECIPES, device="cpu", num_shards=3, batch_tokens=64, **run)


def rows(out):
    found = {}
    for table in TABLES:
        parts = [pq.read_table(f).to_pylist() for f in committed_files(out, table)]
        found[table] = sorted(json.dumps(r, sort_keys=True, default=str) for p in parts for r in p)
    return found


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("bert")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    out = run_executor(load_job(make_job(tmp_path_factory.mktemp("ref"), model)), quiet=True).output
    return rows(out)


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as c:
        yield c


def test_two_workers_give_the_rows_of_the_local_executor(tmp_path, model, reference, cluster):
    job = load_job(make_job(tmp_path, model, executor="dask", scheduler=cluster.scheduler_address))
    summary = run_executor(job, quiet=True)
    assert summary.shards_run and sorted(summary.shards_run) == [0, 1, 2]
    assert rows(summary.output) == reference
    assert verify(summary.output).ok and not (summary.output / paths.LOCK).exists()
    again = run_executor(job, quiet=True)  # everything committed: nothing to do
    assert again.shards_run == [] and again.shards_skipped == [0, 1, 2]


def test_killed_worker_is_replaced_and_failing_shard_is_reported(tmp_path, model, reference, monkeypatch):
    """One worker is SIGKILLed mid-shard (its nanny starts a new one, the task runs again);
    shard 2 raises on every attempt: the job exits non-zero naming it, shards 0 and 1 are
    committed, and a rerun without the failure completes with the reference rows."""
    from distributed import LocalCluster

    monkeypatch.setenv("ATTNPIPE_FAULT", "batch:2")
    monkeypatch.setenv("ATTNPIPE_FAULT_ONCE", str(tmp_path / "killed-once"))
    monkeypatch.setenv("ATTNPIPE_FAIL_SHARD", "2")
    job_file = make_job(tmp_path / "job", model, retries=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as c:
        result = CliRunner().invoke(cli, ["run", str(job_file), "--scheduler", c.scheduler_address, "--quiet"])
    assert (tmp_path / "killed-once").exists(), "a worker was killed"
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert "1 of 3 shards failed after 2 attempts" in line and "shard 2: RuntimeError: injected failure" in line
    out = tmp_path / "job" / "out"
    assert sorted(read_records(out)) == [0, 1]
    failure = json.loads(paths.failure_path(out, 2).read_text())
    assert failure["attempts"] == 2 and "injected failure" in failure["error"]
    report = verify(out)
    assert report.ok, (report.problems, report.strays)  # the killed attempt's files were cleaned up
    assert not (out / paths.STAGING).exists() and not (out / paths.LOCK).exists()

    for name in ("ATTNPIPE_FAULT", "ATTNPIPE_FAULT_ONCE", "ATTNPIPE_FAIL_SHARD"):
        monkeypatch.delenv(name)
    summary = run_executor(load_job(job_file), quiet=True)  # in-process this time: retries shard 2
    assert summary.shards_run == [2]
    assert rows(out) == reference
    assert not paths.failure_path(out, 2).exists()


def test_unreachable_scheduler_is_one_line(tmp_path, model):
    job = load_job(make_job(tmp_path, model, executor="dask", scheduler="tcp://127.0.0.1:9"))
    with pytest.raises(AttnpipeError) as info:
        run_executor(job, quiet=True)
    assert "run.scheduler" in str(info.value) and "dask scheduler" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_quiet_dask_run_prints_nothing(tmp_path, model):
    """Under --quiet neither the workers' library bars (transformers' "Loading weights") nor
    Dask's warnings reach the terminal; the output is complete."""
    import os
    import subprocess
    import sys

    job_file = make_job(tmp_path, model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "attnpipe.cli", "run", str(job_file), "--workers", "2", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr[-3000:]
    assert sorted(read_records(tmp_path / "out")) == [0, 1, 2]
