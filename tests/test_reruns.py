"""Reruns that follow the user: the job fingerprint holds what the data depends on, not where the
corpus or model lives, and a larger `--limit` grows the data like appended rows do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from conftest import invoke

from attnpipe.store import committed_files

TEXTS = [f"Document number {i} says something about topic {i % 3}." for i in range(9)]


def make_project(root: Path, model: Path) -> Path:
    """A project folder as a user lays it out: job, corpus and model side by side, relative paths."""
    root.mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    shutil.copytree(model, root / "model")
    (root / "job.toml").write_text('name = "moved"\n[corpus]\npath = "data/corpus.jsonl"\n'
                                   '[model]\nname = "model"\nmax_length = 32\nstride = 4\n'
                                   '[run]\nnum_shards = 2\ndevice = "cpu"\nprogress = false\n'
                                   '[[recipes]]\nname = "head_stats"\n')
    return root / "job.toml"


def doc_ids(out: Path) -> list[str]:
    return sorted(i for f in committed_files(out, "documents") for i in pq.read_table(f, columns=["doc_id"])
                  .column("doc_id").to_pylist())


def test_larger_limit_adds_shards_smaller_is_refused(tmp_path, tiny_model_dir):
    job = make_project(tmp_path / "proj", tiny_model_dir("bert"))
    out = tmp_path / "out"
    assert invoke("run", job, "-o", out, "--limit", 4, "-q").exit_code == 0
    first = {p: p.stat().st_mtime_ns for p in (out / "_commits").iterdir()}
    assert len(doc_ids(out)) == 4

    grown = invoke("run", job, "-o", out, "-q")  # the README's workflow: --limit first, then all
    assert grown.exit_code == 0, grown.output
    assert len(doc_ids(out)) == len(TEXTS)
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # committed shards untouched

    shrunk = invoke("run", job, "-o", out, "--limit", 3)
    assert shrunk.exit_code == 1
    line = shrunk.output.strip().splitlines()[-1]
    assert "corpus.limit is 3" in line and f"--limit {len(TEXTS)}" in line and "--new-run" in line
    assert invoke("verify", out).exit_code == 0


def test_moved_project_and_copied_corpus_resume(tmp_path, tiny_model_dir):
    job = make_project(tmp_path / "proj", tiny_model_dir("bert"))
    out = tmp_path / "out"
    assert invoke("run", job, "-o", out, "--limit", 5, "-q").exit_code == 0
    before = doc_ids(out)

    shutil.move(tmp_path / "proj", tmp_path / "moved" / "elsewhere")  # project folder moved
    moved = tmp_path / "moved" / "elsewhere" / "job.toml"
    again = invoke("run", moved, "-o", out, "--limit", 5)
    assert again.exit_code == 0, again.output
    assert "0 shards run, 2 already committed" in again.output
    assert doc_ids(out) == before

    resumed = invoke("run", moved, "-o", out, "-q")  # then the rest, from the moved folder
    assert resumed.exit_code == 0, resumed.output
    assert len(doc_ids(out)) == len(TEXTS)


def test_another_corpus_under_the_same_job_is_refused(tmp_path, tiny_model_dir):
    job = make_project(tmp_path / "proj", tiny_model_dir("bert"))
    out = tmp_path / "out"
    assert invoke("run", job, "-o", out, "-q").exit_code == 0
    (tmp_path / "proj" / "data" / "corpus.jsonl").write_text(json.dumps({"text": "Something else."}) + "\n" * 1
                                                               + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    result = invoke("run", job, "-o", out)
    assert result.exit_code == 1 and "corpus changed" in result.output and "--new-run" in result.output


def test_default_text_unit_spelled_out_is_the_same_job(tmp_path):
    from attnpipe.job import build_job

    (tmp_path / "docs").mkdir()
    (tmp_path / "one.txt").write_text("a\n")
    for path, unit in (("docs", "file"), ("docs/*.txt", "file"), ("one.txt", "line")):
        implicit = build_job({"corpus": {"path": path}}, base_dir=tmp_path)
        explicit = build_job({"corpus": {"path": path, "text_unit": unit}}, base_dir=tmp_path)
        other = build_job({"corpus": {"path": path, "text_unit": "paragraph"}}, base_dir=tmp_path)
        assert implicit.fingerprint() == explicit.fingerprint() != other.fingerprint()


def test_deleted_dataset_json_does_not_block_the_rerun(tmp_path, tiny_model_dir):
    job = make_project(tmp_path / "proj", tiny_model_dir("bert"))
    out = tmp_path / "out"
    assert invoke("run", job, "-o", out, "--limit", 4, "-q").exit_code == 0
    (out / "_dataset.json").unlink()
    assert invoke("verify", out).exit_code == 1  # verify says it is missing
    again = invoke("run", job, "-o", out)  # the records say whose data this is: continue, grow
    assert again.exit_code == 0, again.output
    assert "2 already committed" in again.output
    assert (out / "_dataset.json").is_file() and len(doc_ids(out)) == len(TEXTS)
    assert invoke("verify", out).exit_code == 0
