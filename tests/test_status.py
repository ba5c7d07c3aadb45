"""`attnpipe status OUT` (committed, failed and pending shards, the lock, rows, throughput, exit
codes 0 / 3 / 1) and `attnpipe run JOB --dry-run` (the plan and its estimates, with nothing
loaded and nothing written), on tiny models."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe import plan_preview
from attnpipe.plan_preview import preview, windows_of
from attnpipe.store import paths, read_records

from conftest import invoke, one_line_error, write_job

SHORT = ["The animal didn't cross the street because it was too tired.", "Why do cats purr?",
         "Rain fell all night; by morning the road was a river.", "Short.",
         "Glass was expensive, and large windows let out precious heat.", "The mill stood by the river."]
# Longer documents, so that windows (max_length 64, stride 8 in write_job) overlap.
LONG = [" ".join(f"Sentence {j} of document {i} says the mill by the river ground {j * i} sacks of grain."
                 for j in range(6 + 5 * i)) for i in range(3)]
TEXTS = SHORT[:3] + LONG + SHORT[3:]  # 9 rows, 3 shards of 3
RECIPES = '[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 2\n'


@pytest.fixture(autouse=True)
def plain_logger():
    """The CLI points logger 'attnpipe' at stderr and stops propagation; put it back after."""
    log = logging.getLogger("attnpipe")
    saved = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]


def write_corpus(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def make_job(folder: Path, model: Path, out: Path, texts=TEXTS) -> Path:
    corpus = folder / "corpus.jsonl"
    if not corpus.exists():
        write_corpus(corpus, texts)
    return write_job(folder, corpus, model, recipes=RECIPES, device="cpu", num_shards=3, output=str(out))


def status_json(out: Path) -> tuple[int, dict]:
    result = invoke("status", out, "--json")
    return result.exit_code, json.loads(result.stdout)




def tree(folder: Path) -> dict:
    """Every path under `folder` with its size and mtime: what "nothing was written" compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def done(tmp_path, tiny_model_dir):
    """A complete 3-shard run on tiny BERT: (job file, output)."""
    out = tmp_path / "out"
    job = make_job(tmp_path, tiny_model_dir("bert"), out)
    assert run_job(load_job(job), quiet=True).shards_run == [0, 1, 2]
    return job, out


# --- status ------------------------------------------------------------------------------------

def test_status_of_a_complete_run(done):
    _, out = done
    records = read_records(out)
    code, s = status_json(out)
    assert code == 0 and s["complete"] is True and s["state"] == "complete" and s["exit_code"] == 0
    assert s["shards"] == {"planned": 3, "committed": [0, 1, 2], "failed": [], "pending": []}
    assert s["lock"] is None
    assert s["documents"] == len(TEXTS) and s["empty_documents"] == 0
    assert s["tokens"] == sum(r["tokens"] for r in records.values()) > 0
    assert s["windows"] == sum(r["windows"] for r in records.values()) > len(TEXTS)  # long documents overlap
    assert set(s["rows"]) == {"documents", "tokens", "words", "head_stats", "edges"}
    assert s["rows"]["documents"] == len(TEXTS)
    assert s["rows"]["edges"] == sum(r["rows"]["edges"] for r in records.values())
    assert s["last_run"]["last_commit"] == max(r["committed_at"] for r in records.values())
    seconds = sum(r["seconds"] for r in records.values())
    assert s["throughput"]["shard_seconds"] == pytest.approx(seconds, abs=1e-3)
    assert s["throughput"]["tokens_per_s"] == pytest.approx(s["tokens"] / seconds, rel=1e-3)
    assert s["throughput"]["documents_per_s"] == pytest.approx(len(TEXTS) / seconds, rel=1e-2)
    assert s["corpus_rows"] == len(TEXTS) and "appended" in s["corpus_note"]
    assert s["versions"] == []

    text = invoke("status", out)
    assert text.exit_code == 0
    assert f"{out}: job 'test', complete: 3 of 3 shards committed, 0 failed, 0 pending" in text.output
    assert "lock:       none" in text.output and "throughput:" in text.output and "tokens/s" in text.output
    assert "until the next run" in text.output


def test_status_of_a_partial_run_lists_pending(done):
    _, out = done
    paths.record_path(out, 1).unlink()
    code, s = status_json(out)
    assert code == 3 and s["complete"] is False and s["state"] == "incomplete"
    assert s["shards"]["committed"] == [0, 2] and s["shards"]["pending"] == [1] and s["shards"]["failed"] == []
    text = invoke("status", out)
    assert text.exit_code == 3
    assert "not complete: 2 of 3 shards committed, 0 failed, 1 pending" in text.output
    assert "pending    1" in text.output


def test_status_shows_failed_shards_and_their_error(done):
    _, out = done
    paths.record_path(out, 2).unlink()
    paths.failure_path(out, 2).parent.mkdir()
    paths.failure_path(out, 2).write_text(json.dumps({
        "shard": 2, "corpus_rows": [6, 9], "error": "RuntimeError: CUDA out of memory\nsecond line",
        "attempts": 3, "executor": "dask", "failed_at": "2026-01-02T03:04:05+0000"}))
    # A failure record of a shard that committed since is not a failure.
    paths.failure_path(out, 0).write_text(json.dumps({"shard": 0, "error": "old news"}))
    code, s = status_json(out)
    assert code == 3 and s["state"] == "failed"
    assert s["shards"]["pending"] == [] and s["shards"]["committed"] == [0, 1]
    [failed] = s["shards"]["failed"]
    assert failed["shard"] == 2 and failed["error"] == "RuntimeError: CUDA out of memory" and failed["attempts"] == 3
    text = invoke("status", out)
    assert text.exit_code == 3
    assert "failed     2: RuntimeError: CUDA out of memory (3 attempts, at 2026-01-02T03:04:05+0000)" in text.output
    assert "old news" not in text.output


def write_lock(out: Path, host: str, pid: int) -> Path:
    lock = out / paths.LOCK
    lock.write_text(json.dumps({"host": host, "pid": pid, "run_id": "feedface0000", "started": "earlier"}) + "\n")
    return lock


def test_status_shows_a_running_run_and_stale_locks(done):
    _, out = done
    paths.record_path(out, 2).unlink()
    lock = write_lock(out, socket.gethostname(), os.getpid())
    code, s = status_json(out)
    assert code == 3 and s["state"] == "running"
    assert s["lock"]["running"] is True and s["lock"]["pid"] == os.getpid() and s["lock"]["stale"] is None
    text = invoke("status", out).output
    assert f"lock:       held by a running run (host {socket.gethostname()}, pid {os.getpid()}, started earlier" in text
    assert not lock.with_name("_lock.stale").exists() and lock.is_file()  # status never takes a lock over

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    write_lock(out, socket.gethostname(), proc.pid)
    _, s = status_json(out)
    assert s["lock"]["running"] is False and "is gone" in s["lock"]["stale"] and s["state"] == "incomplete"
    assert "stale, left by a dead run" in invoke("status", out).output

    write_lock(out, "another-host", 1)  # another host: judged by the lease (900 s by default)
    assert status_json(out)[1]["lock"]["running"] is True
    old = time.time() - 1000
    os.utime(lock, (old, old))
    _, s = status_json(out)
    assert s["lock"]["running"] is False and "lease 900 s" in s["lock"]["stale"]


def test_status_lists_later_versions(done):
    _, out = done
    v2 = out / "v2"
    v2.mkdir()
    shutil.copy(out / paths.DATASET, v2 / paths.DATASET)
    shutil.copytree(out / paths.COMMITS, v2 / paths.COMMITS)
    paths.record_path(v2, 0).unlink()
    code, s = status_json(out)
    assert code == 0 and s["output"] == str(out)  # the status of OUT itself
    assert s["versions"] == [{"output": str(v2), "state": "incomplete", "committed": 2, "planned": 3, "failed": 0,
                              "last_commit": s["versions"][0]["last_commit"]}]
    assert f"later version {v2}: incomplete, 2 of 3 shards committed, 0 failed" in invoke("status", out).output


def test_status_errors_are_one_line(tmp_path, done):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    assert "is not an attnpipe output" in one_line_error(invoke("status", plain))
    assert "does not exist" in one_line_error(invoke("status", tmp_path / "missing"))
    old = tmp_path / "old"
    old.mkdir()
    (old / paths.MANIFEST).write_text(json.dumps({"format_version": 1}))
    assert "attnpipe 0.1" in one_line_error(invoke("status", old))
    _, out = done
    paths.record_path(out, 1).write_text("{not json")
    assert "shard-00001.json cannot be read" in one_line_error(invoke("status", out, "--json"))


# --- run --dry-run -----------------------------------------------------------------------------

def test_dry_run_of_a_fresh_job_writes_nothing_and_estimates_tokens(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "result" / "out"
    job = make_job(tmp_path, tiny_model_dir("bert"), out)
    before = tree(tmp_path)
    result = invoke("run", job, "--dry-run")
    assert result.exit_code == 0, result.output
    assert tree(tmp_path) == before and not out.parent.exists()  # no folder, no lock, nothing
    text = result.output
    assert f"output:     {out} (a new folder)" in text
    assert "to run:     3 shards, 9 documents" in text
    for shard, span in ((0, "0-3"), (1, "3-6"), (2, "6-9")):
        assert any(line.split()[:3] == [str(shard), span, "3"] for line in text.splitlines()), text
    assert "estimates (rough" in text and "head_stats r0" in text and "edges r1 topk k=2" in text

    plan = preview(load_job(job))
    assert [s["shard"] for s in plan["to_run"]] == [0, 1, 2] and plan["committed"]["shards"] == []
    assert plan["model"]["layers"] == 2 and plan["model"]["heads"] == 4 and plan["model"]["tokenizer"]
    assert plan["estimate"]["method"] == "tokenizer sample"

    summary = run_job(load_job(job), quiet=True)
    records = read_records(summary.output)
    real = sum(r["tokens"] for r in records.values())
    estimated = plan["estimate"]["tokens"]
    assert real / 1.5 <= estimated <= real * 1.5, (estimated, real)
    for s in plan["to_run"]:  # per shard too
        assert records[s["shard"]]["tokens"] / 1.5 <= s["tokens"] <= records[s["shard"]]["tokens"] * 1.5
    assert plan["estimate"]["windows"] == sum(r["windows"] for r in records.values())
    rows = {t["table"]: t["rows"] for t in plan["estimate"]["tables"]}
    real_rows = {t: sum(r["rows"][t] for r in records.values()) for t in ("head_stats", "edges")}
    for table in ("head_stats", "edges"):
        assert real_rows[table] / 1.5 <= rows[table] <= real_rows[table] * 1.5, table

    # With fewer documents sampled than pending, the rest are scaled by tokens per character.
    monkeypatch.setattr(plan_preview, "SAMPLE_DOCS", 3)
    (out / paths.COMMITS).rename(tmp_path / "records")  # as if nothing were committed
    sampled = preview(load_job(job))["estimate"]
    assert sampled["sampled_documents"] == 3 and sampled["documents"] == len(TEXTS)
    assert real / 1.5 <= sampled["tokens"] <= real * 1.5, (sampled["tokens"], real)


def test_dry_run_of_a_half_done_output_lists_only_pending_shards(done):
    job, out = done
    paths.record_path(out, 1).unlink()  # as a kill before shard 1's record leaves it
    before = tree(out)
    result = invoke("run", job, "--dry-run")
    assert result.exit_code == 0, result.output
    assert tree(out) == before  # the uncommitted files of shard 1 are still there: no recovery ran
    text = result.output
    assert f"output:     {out} (resumes it)" in text
    assert "committed:  2 shards (0, 2)" in text and "to run:     1 shard, 3 documents" in text
    plan = preview(load_job(job))
    assert [s["shard"] for s in plan["to_run"]] == [1] and plan["to_run"][0]["corpus_rows"] == [3, 6]

    write_corpus(job.parent / "corpus.jsonl", TEXTS + ["Appended one.", "Appended two."])
    plan = preview(load_job(job))
    assert [(s["shard"], s["corpus_rows"]) for s in plan["to_run"]] == [(1, [3, 6]), (3, [9, 11])]
    assert tree(out) == before

    new = invoke("run", job, "--dry-run", "--new-run")
    assert new.exit_code == 0 and f"output:     {out / 'v2'} (a new version" in new.output
    assert not (out / "v2").exists()


def test_dry_run_refuses_what_the_run_refuses(done):
    job, out = done
    write_corpus(job.parent / "corpus.jsonl", ["Changed in place."] + TEXTS[1:])
    assert "the corpus changed since shard 0" in one_line_error(invoke("run", job, "--dry-run"))


def test_dry_run_without_a_tokenizer_counts_characters(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), model)
    (model / "tokenizer.json").unlink()
    plan = preview(load_job(make_job(tmp_path, model, tmp_path / "out")))
    assert plan["estimate"]["method"].startswith("characters / 4")
    assert plan["estimate"]["tokens"] > sum(len(t) for t in TEXTS) // 4


def test_dry_run_loads_no_torch(tmp_path, tiny_model_dir):
    job = make_job(tmp_path, tiny_model_dir("bert"), tmp_path / "out")
    code = ("import sys\nfrom attnpipe.cli import cli\n"
            "try:\n    cli(['run', sys.argv[1], '--dry-run'], prog_name='attnpipe')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout and "to run:     3 shards" in result.stdout


def test_windows_of_matches_the_tokenizer(tokenizer):
    """The window arithmetic equals what the fast tokenizer does with overflow and stride."""
    texts = [" ".join(f"word{i}" for i in range(400)), "short text", "x " * 57]
    content = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    for length, stride in ((64, 8), (32, 0), (128, 32), (60, 57)):
        enc = tokenizer(texts, truncation=True, max_length=length, stride=stride,
                        return_overflowing_tokens=True, padding=False)
        full, last = windows_of(content, length, 2, stride)
        assert int((full + (last > 0)).sum()) == len(enc["input_ids"]), (length, stride)
        assert int((full * length + last).sum()) == sum(len(ids) for ids in enc["input_ids"]), (length, stride)
    assert windows_of([0], 64, 2, 8)[1].tolist() == [0]  # no tokens, no window
