"""Corpora as people lay them out (text files as files, paragraphs or lines; nested folders;
where each document came from) and the bad corpus and job inputs that probing found: each
refused with one line naming the file, line, key or value."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnpipe.corpus import Corpus, open_corpus
from attnpipe.errors import CorpusError, JobError
from attnpipe.executor.local import run_job
from attnpipe.inspect import open_table
from attnpipe.job import CorpusSpec, load_job
from attnpipe.store.plan import make_plan

from conftest import invoke, raises_one_line, write_job




def _docs(base: Path, **spec) -> list[tuple[str, str | None, int | None]]:
    """(text, source_file, source_index) of every document."""
    spec = CorpusSpec(**spec)
    corpus = Corpus(open_corpus(spec, base), spec)
    rows = np.arange(len(corpus))
    sources = corpus.sources(rows)
    return list(zip(corpus.texts(rows), sources["source_file"].to_pylist(), sources["source_index"].to_pylist()))


@pytest.fixture
def folder(tmp_path) -> Path:
    """docs/a.txt (two paragraphs, with a BOM), docs/b.txt (one line), docs/blank.txt (blank only)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes("\ufeffThe cat sat.\nOn the mat.\n\n \n\nRain fell.\n".encode())
    (docs / "b.txt").write_text("Why do rivers bend?", encoding="utf-8")
    (docs / "blank.txt").write_text("\n  \n", encoding="utf-8")
    return tmp_path


# --- text files: one document per file, paragraph or line ---------------------------------------

def test_folder_of_txt_is_one_document_per_file(folder):
    assert _docs(folder, path="docs") == [("The cat sat.\nOn the mat.\n\n \n\nRain fell.\n", "a.txt", None),
                                          ("Why do rivers bend?", "b.txt", None),
                                          ("\n  \n", "blank.txt", None)]  # an empty document, counted


def test_glob_of_txt_is_one_document_per_file(folder):
    assert [d[1] for d in _docs(folder, path="docs/*.txt")] == ["a.txt", "b.txt", "blank.txt"]


def test_paragraphs(folder):
    assert _docs(folder, path="docs", text_unit="paragraph") == [
        ("The cat sat.\nOn the mat.", "a.txt", 1), ("Rain fell.", "a.txt", 2), ("Why do rivers bend?", "b.txt", 1)]


def test_lines_skip_blank_lines_and_keep_line_numbers(folder):
    assert _docs(folder, path="docs", text_unit="line") == [
        ("The cat sat.", "a.txt", 1), ("On the mat.", "a.txt", 2), ("Rain fell.", "a.txt", 6),
        ("Why do rivers bend?", "b.txt", 1)]


def test_single_txt_file_is_one_document_per_line(folder):
    assert _docs(folder, path="docs/a.txt") == [("The cat sat.", "a.txt", 1), ("On the mat.", "a.txt", 2),
                                                ("Rain fell.", "a.txt", 6)]
    assert len(_docs(folder, path="docs/a.txt", text_unit="file")) == 1


def test_windows_line_endings(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert _docs(tmp_path, path="c.txt") == [("one", "c.txt", 1), ("two", "c.txt", 2), ("three", "c.txt", 4)]
    assert [d[0] for d in _docs(tmp_path, path="c.txt", text_unit="paragraph")] == ["one\ntwo", "three"]


def test_text_unit_is_for_text_files_only(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.jsonl", text_unit="line"), tmp_path)
    assert "corpus.text_unit" in message and "c.jsonl" in message


def test_text_unit_is_validated(tmp_path):
    (tmp_path / "job.toml").write_text('[corpus]\npath = "docs"\ntext_unit = "para"\n')
    message = raises_one_line(JobError, load_job, tmp_path / "job.toml")
    assert "corpus.text_unit" in message and "'paragraph'" in message and "'para'" in message


def test_recursive_glob(tmp_path):
    for rel in ("docs/a.jsonl", "docs/x/b.jsonl", "docs/x/y/c.jsonl", "docs/.hidden/d.jsonl"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps({"text": rel}) + "\n")
    assert [d[1] for d in _docs(tmp_path, path="docs/**/*.jsonl")] == ["a.jsonl", "x/b.jsonl", "x/y/c.jsonl"]
    assert [d[1] for d in _docs(tmp_path, path="docs/*/*.jsonl")] == ["x/b.jsonl"]


# --- where documents came from: json, csv, parquet, and none -----------------------------------

def test_sources_of_json_csv_parquet(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert _docs(tmp_path, path="c.jsonl") == [("a", "c.jsonl", 1), ("b", "c.jsonl", 3)]  # lines
    (tmp_path / "l.json").write_text('[{"text": "a"},\n {"text": "b"}]')
    assert _docs(tmp_path, path="l.json") == [("a", "l.json", 1), ("b", "l.json", 2)]  # elements
    (tmp_path / "c.csv").write_text('text\n"two\nlines"\nb\n')
    assert _docs(tmp_path, path="c.csv") == [("two\nlines", "c.csv", 1), ("b", "c.csv", 2)]  # data rows
    docs = tmp_path / "pq"
    docs.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), docs / "1.parquet")
    pq.write_table(pa.table({"text": ["c"]}), docs / "2.parquet")
    assert _docs(tmp_path, path="pq") == [("a", "1.parquet", 1), ("b", "1.parquet", 2), ("c", "2.parquet", 1)]


def test_save_to_disk_has_no_source(tmp_path):
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "saved"))
    assert _docs(tmp_path, path="saved") == [("a", None, None)]


def test_documents_table_has_source_columns(folder, tiny_model_dir):
    job = load_job(write_job(folder, "docs", model=tiny_model_dir("bert"), extra='text_unit = "paragraph"',
                             device="cpu"))
    run_job(job, quiet=True)
    rows = open_table(folder / "out", "documents").to_table().to_pylist()
    assert sorted((r["source_file"], r["source_index"]) for r in rows) == [("a.txt", 1), ("a.txt", 2), ("b.txt", 1)]


# --- blank input: the same rule everywhere -------------------------------------------------------

@pytest.mark.parametrize("name, content, spec", [
    ("c.txt", "\n \n\t\n", {}),
    ("c.txt", "\n \n", {"text_unit": "paragraph"}),
    ("c.jsonl", '{"text": ""}\n{"text": "  "}\n{"text": null}\n', {}),
    ("c.csv", 'text,id\n"",1\n" ",2\n', {}),
    ("docs", None, {}),
])
def test_corpus_of_blank_documents_is_refused_alike(tmp_path, name, content, spec):
    if content is None:
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text("  \n")
        (tmp_path / "docs" / "b.txt").write_text("")
    else:
        (tmp_path / name).write_text(content)
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path=name, **spec), tmp_path)
    assert message.startswith(f"corpus {name} has no text: no rows, or only empty or whitespace documents")


def test_limit_of_blank_documents_is_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": "real"}\n')
    assert "(1 rows (corpus.limit)" in raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.jsonl", limit=1), tmp_path)
    assert len(open_corpus(CorpusSpec(path="c.jsonl"), tmp_path)) == 2  # one empty document among text: fine


# --- values that are not text, ids that are not scalars -----------------------------------------

@pytest.mark.parametrize("value, kind", [(5, "a number"), (["x"], "a list"), ({"a": 1}, "an object"),
                                         (True, "a boolean")])
def test_non_string_text_in_json_is_refused(tmp_path, value, kind):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.jsonl"), tmp_path)
    assert f"{tmp_path / 'c.jsonl'}, line 2" in message and "'text'" in message and kind in message


@pytest.mark.parametrize("column", [pa.array([1, 2]), pa.array([[1], [2]]), pa.array([b"a", b"b"])])
def test_non_string_text_in_parquet_is_refused(tmp_path, column):
    pq.write_table(pa.table({"text": column}), tmp_path / "c.parquet")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.parquet"), tmp_path)
    assert "corpus.text_column 'text'" in message and "row 0 (c.parquet, record 1)" in message
    assert str(column.type) in message


def test_mixed_types_in_a_column_are_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a", "n": 1}\n{"text": "b", "n": "two"}\n')
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.jsonl", metadata_columns=["n"]), tmp_path)
    assert "'n' mixes types: a number (line 1) and a string (line 2)" in message


def test_numbers_in_a_csv_text_column_are_text(tmp_path):
    (tmp_path / "c.csv").write_text("text,id\n5,1\nNA,2\nnull,3\n")
    assert [d[0] for d in _docs(tmp_path, path="c.csv", id_column="id")] == ["5", "NA", "null"]


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}])
def test_non_scalar_ids_are_refused(tmp_path, value):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a", "id": 1}) + "\n" + json.dumps({"text": "b", "id": value}))
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.jsonl", id_column="id"), tmp_path)
    assert "line 2" in message and "corpus.id_column 'id'" in message
    pq.write_table(pa.table({"text": ["a"], "id": [value]}), tmp_path / "c.parquet")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.parquet", id_column="id"), tmp_path)
    assert "corpus.id_column 'id'" in message and "strings or numbers" in message


def test_duplicate_csv_header_is_refused(tmp_path):
    (tmp_path / "c.csv").write_text("text,text\nfirst,second\n")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.csv"), tmp_path)
    assert "'text' twice (columns 1 and 2)" in message and "c.csv" in message


@pytest.mark.parametrize("name, content, spec", [
    ("c.txt", "hello\n", {}), ("c.jsonl", '{"text": "hello"}\n', {}), ("c.csv", "text\nhello\n", {}),
    ("d.txt", "hello", {"text_unit": "file"})])
def test_byte_order_mark_is_dropped(tmp_path, name, content, spec):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert _docs(tmp_path, path=name, **spec)[0][0] == "hello"


@pytest.mark.parametrize("name, spec", [("c.json", {"format": "json"}), ("c.jsonl.gz", {"format": "json"}),
                                        ("c.txt", {})])
def test_compressed_input_is_named(tmp_path, name, spec):
    (tmp_path / name).write_bytes(gzip.compress(b'{"text": "a"}\n'))
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path=name, **spec), tmp_path)
    assert "gzip-compressed" in message and str(tmp_path / name) in message


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n')
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="c.jsonl"), tmp_path)
    assert f"{tmp_path / 'c.jsonl'}, line 2: not valid JSON" in message


# --- symlinks --------------------------------------------------------------------------------

def test_dangling_symlink_in_folder_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "docs" / "b.txt")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="docs"), tmp_path)
    assert str(tmp_path / "docs" / "b.txt") in message and "dangling symlink" in message


def test_symlink_loop_in_folder_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    os.symlink("loop.txt", tmp_path / "docs" / "loop.txt")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="docs"), tmp_path)
    assert str(tmp_path / "docs" / "loop.txt") in message and "symlink loop" in message


def test_folder_link_loop_under_recursive_glob_is_refused(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("hello")
    os.symlink("..", tmp_path / "docs" / "sub" / "up")
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="docs/**/*.txt"), tmp_path)
    assert "loop" in message and str(tmp_path / "docs" / "sub" / "up") in message


@pytest.mark.parametrize("target", ["loop", "missing"])
def test_broken_corpus_path_is_local_not_a_hub_name(tmp_path, target):
    os.symlink(target, tmp_path / "loop")  # "loop" -> itself, or to nothing
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="loop"), tmp_path)
    assert str(tmp_path / "loop") in message and "Hub" not in message
    assert ("symlink loop" if target == "loop" else "dangling symlink") in message


# --- job values ------------------------------------------------------------------------------

@pytest.mark.parametrize("body, key", [
    ('[corpus]\npath = ""\n', "corpus.path"),
    ('[corpus]\npath = "c.jsonl"\nlimit = 1979-05-27\n', "corpus.limit"),
    ('[corpus]\npath = "c.jsonl"\n[run]\nlock_lease = inf\n', "run.lock_lease"),
    ('[corpus]\npath = "c.jsonl"\n[run]\nlock_lease = 0.01\n', "run.lock_lease"),
    ('[corpus]\npath = "c.jsonl"\n[run]\nlock_lease = 1e9\n', "run.lock_lease"),
    ('[corpus]\npath = "c.jsonl"\n[run]\nnum_shards = 9223372036854775807\n', "run.num_shards"),
    ('[corpus]\npath = "c.jsonl"\n[run]\noutput = ""\n', "run.output"),
    ('[corpus]\npath = "c.jsonl"\n[[recipes]]\nname = "threshold"\nt = nan\n', "recipes[0].t"),
])
def test_bad_job_values(tmp_path, body, key):
    (tmp_path / "job.toml").write_text(body)
    assert f"'{key}'" in raises_one_line(JobError, load_job, tmp_path / "job.toml")


def test_job_file_with_byte_order_mark(tmp_path):
    (tmp_path / "job.toml").write_bytes(b'\xef\xbb\xbf[corpus]\npath = "c.jsonl"\n')
    assert load_job(tmp_path / "job.toml").corpus.path == "c.jsonl"


def test_empty_output_flag_is_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    job = write_job(tmp_path, "c.jsonl")
    result = invoke("run", job, "-o", "", "--dry-run")
    assert result.exit_code == 1 and "'run.output'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_plan_has_no_shard_past_the_corpus_rows():
    plan = make_plan(3, 100_000, None, {})
    assert plan["shards"] == [[0, 1], [1, 2], [2, 3]]


def test_dry_run_with_many_shards_plans_only_the_rows(tmp_path, tiny_model_dir):
    (tmp_path / "c.jsonl").write_text('{"text": "a b"}\n{"text": "c d"}\n')
    job = write_job(tmp_path, "c.jsonl", model=tiny_model_dir("bert"), num_shards=100_000)
    result = invoke("run", job, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "2 rows in 2 shards" in result.output


def test_mixed_text_in_a_saved_dataset_is_refused(tmp_path):
    """datasets keeps a column of mixed values as JSON strings ('"a"', '5'): never read as texts."""
    (tmp_path / "c.jsonl").write_text('{"text": "a b"}\n{"text": 5}\n')
    datasets.load_dataset("json", data_files=[str(tmp_path / "c.jsonl")], split="train").save_to_disk(
        str(tmp_path / "saved"))
    message = raises_one_line(CorpusError, open_corpus, CorpusSpec(path="saved"), tmp_path)
    assert "corpus.text_column 'text'" in message and "mixed types (int among strings)" in message
    assert "row 1" in message
