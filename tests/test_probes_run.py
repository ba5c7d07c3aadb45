"""What probing found in `attnpipe run`, each as a test: a live run's lock is never taken over
on its own host whatever the lease, `--new-run` beside a live run is refused, a lock that cannot
be renewed stops the run with one line, and the progress bar counts steadily to the exact
number of tokens with every shard shown done."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attnpipe.job
from attnpipe.errors import OutputError
from attnpipe.executor import base
from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.store import read_records
from attnpipe.store.location import Location
from attnpipe.store.lock import OutputLock

from conftest import invoke, write_job

TEXTS = [f"Note {i}: the river ran past the mill" + ", and the birds sang" * (i % 5) + "." for i in range(12)]


@pytest.fixture(autouse=True)
def plain_logger():
    """The CLI points logger 'attnpipe' at stderr and stops propagation; put it back after."""
    log = logging.getLogger("attnpipe")
    saved = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:], log.propagate, log.level = saved


def make_job(tmp_path: Path, model: Path, **run) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run.setdefault("num_shards", 3)
    return write_job(tmp_path, corpus, model, device="cpu", batch_tokens=64, **run)


def write_lock(out: Path, pid: int, age: float = 0.0, host: str | None = None) -> Path:
    lock = out / "_lock"
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "run_id": "feedface0000",
                                "started": "earlier"}) + "\n")
    if age:
        then = time.time() - age
        os.utime(lock, (then, then))
    return lock


@pytest.fixture
def sleeper():
    """A live process on this host: the holder of a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def model(tiny_model_dir):
    return tiny_model_dir("bert")


# --- locks -------------------------------------------------------------------------------------

def test_a_live_holder_on_this_host_keeps_its_lock_whatever_the_lease(tmp_path, sleeper):
    """Not renewed for a day, a lease of 0.01 s: the holder lives, so the lock is its own."""
    out = tmp_path / "out"
    out.mkdir()
    lock = write_lock(out, sleeper, age=86400)
    with pytest.raises(OutputError, match=f"pid {sleeper}") as info:
        OutputLock(out, lease=0.01).acquire()
    assert socket.gethostname() in str(info.value)
    assert json.loads(lock.read_text())["pid"] == sleeper
    # Another host's lock is judged by the lease: that one is taken over.
    write_lock(out, 4242, age=60, host="elsewhere.invalid")
    taker = OutputLock(out, lease=10)
    taker.acquire()
    assert taker.held()
    taker.release()


def test_new_run_refused_while_another_run_holds_the_output(tmp_path, model, sleeper):
    job = make_job(tmp_path, model)
    out = tmp_path / "out"
    assert sorted(read_records(out) if out.exists() else {}) == []
    run_job(load_job(job), quiet=True)
    write_lock(out, sleeper)
    result = invoke("run", job, "--new-run", "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line and f"pid {sleeper}" in line and f"host {socket.gethostname()}" in line, line
    assert not (out / "v2").exists()  # nothing created beside the live run


def test_a_lock_that_cannot_be_renewed_stops_the_run(tmp_path, model, monkeypatch):
    """lease = inf (the renewal thread's wait overflows): one line, exit 1, nothing left; the
    shards committed before the stop are kept, and a rerun with a sane lease completes."""
    job = make_job(tmp_path, model)
    real_load = attnpipe.job.load_job

    def load_with_infinite_lease(*args, **kwargs):
        spec = real_load(*args, **kwargs)
        spec.run.lock_lease = float("inf")  # what job validation now refuses, forced past it
        return spec

    monkeypatch.setattr(attnpipe.job, "load_job", load_with_infinite_lease)
    result = invoke("run", job, "--quiet")
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "could not be renewed" in line and "Traceback" not in line, line
    out = tmp_path / "out"
    assert not (out / "_lock").exists() and not (out / "_staging").exists()
    monkeypatch.undo()
    assert invoke("run", job, "--quiet").exit_code == 0
    assert sorted(read_records(out)) == [0, 1, 2]


def test_a_renewal_that_raises_stops_the_run_between_batches(tmp_path, model, monkeypatch):
    """Storage that fails in a way no retry cures: the run stops at its next batch, not at its
    end with exit 0."""
    job = load_job(make_job(tmp_path, model))
    job.run.lock_lease = 0.2  # renewed every 0.05 s: the first renewal comes within the run

    def touch(self, rel):
        raise RuntimeError("the store refused the write")

    monkeypatch.setattr(Location, "touch", touch)
    started = []
    real_call = base.Progress.__call__

    def slow(self, *args):  # the run must outlast one renewal
        started.append(1)
        time.sleep(0.1)
        real_call(self, *args)

    monkeypatch.setattr(base.Progress, "__call__", slow)
    with pytest.raises(OutputError, match="could not be renewed .RuntimeError: the store refused the write"):
        run_job(job, quiet=True)
    assert len(started) <= 2
    assert not (tmp_path / "out" / "_lock").exists()


# --- progress ----------------------------------------------------------------------------------

class Bar:
    """Stands in for tqdm: records the total, the count and the postfix at every step."""

    seen: list = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.postfix = total, 0, ""
        Bar.seen = [("start", total, 0, "")]

    def update(self, n):
        self.n += n
        Bar.seen.append(("update", self.total, self.n, self.postfix))

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def refresh(self):
        Bar.seen.append(("refresh", self.total, self.n, self.postfix))

    def close(self):
        Bar.seen.append(("close", self.total, self.n, self.postfix))


def test_progress_total_is_estimated_once_and_only_grows(tmp_path, model, monkeypatch):
    from attnpipe.plan_preview import preview

    job_file = make_job(tmp_path, model, num_shards=4, progress=True)
    estimate = preview(load_job(job_file))["estimate"]["tokens"]
    monkeypatch.setattr(base, "tqdm", Bar)
    summary = run_job(load_job(job_file))
    done = summary.totals["tokens"]
    kind, first, _, _ = Bar.seen[0]
    assert kind == "start" and first == estimate  # the dry run's estimate, before any shard
    totals = [t for kind, t, _, _ in Bar.seen if kind != "close"]
    assert totals == sorted(totals), totals  # never back down while running
    kind, total, n, postfix = Bar.seen[-1]
    assert kind == "close" and total == n == done  # ends on the exact count
    assert postfix == f"{len(TEXTS)}/{len(TEXTS)} docs, shards 4/4"


def test_one_shard_is_singular(tmp_path, model):
    job = make_job(tmp_path, model, num_shards=1)
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    assert "1 shard run;" in result.output and "1 shards" not in result.output
