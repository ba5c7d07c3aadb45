"""Corpus reading: every supported local source, column checks, ids, clear errors for missing,
empty and non-UTF-8 input, deterministic shards, and empty documents."""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnpipe.corpus import Corpus, open_corpus
from attnpipe.errors import CorpusError
from attnpipe.store.plan import contiguous
from attnpipe.executor.local import run_job
from attnpipe.inspect import open_table
from attnpipe.job import CorpusSpec, load_job

from conftest import write_job

ROWS = [{"text": "The cat sat on the mat.", "id": "d1", "topic": "pets"},
        {"text": "Rain, then sun, then rain again.", "id": "d2", "topic": "weather"},
        {"text": "Why do rivers bend?", "id": "d3", "topic": "rivers"}]
TEXTS = [r["text"] for r in ROWS]


def _open(base, **spec):
    return open_corpus(CorpusSpec(**spec), base)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _corpus(base, spec):
    return Corpus(open_corpus(spec, base), spec)


def _sha16(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# --- formats ---------------------------------------------------------------------------------

def test_txt_one_document_per_line(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    ds = _open(tmp_path, path="c.txt")
    assert ds["text"][:] == TEXTS


def test_jsonl(tmp_path):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    ds = _open(tmp_path, path="c.jsonl", id_column="id")
    assert ds["text"][:] == TEXTS and ds["id"][:] == ["d1", "d2", "d3"]


def test_csv_with_quoted_commas(tmp_path):
    lines = ["text,id,topic"] + [f'"{r["text"]}",{r["id"]},{r["topic"]}' for r in ROWS]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = _open(tmp_path, path="c.csv", metadata_columns=["topic"])
    assert ds["text"][:] == TEXTS and ds["topic"][:] == ["pets", "weather", "rivers"]


def test_tsv(tmp_path):
    lines = ["text\tid\ttopic"] + [f'{r["text"]}\t{r["id"]}\t{r["topic"]}' for r in ROWS]
    (tmp_path / "c.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = _open(tmp_path, path="c.tsv", id_column="id", metadata_columns=["topic"])
    assert ds.column_names[:3] == ["text", "id", "topic"]  # the columns the job names, in that order
    assert ds["text"][:] == TEXTS


def test_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    ds = _open(tmp_path, path="c.parquet", id_column="id")
    assert ds["text"][:] == TEXTS and ds["id"][:] == ["d1", "d2", "d3"]


def test_folder_of_files_in_name_order(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", ROWS[2:])
    _jsonl(folder / "a.jsonl", ROWS[:2])
    (folder / "README.md").write_text("not a corpus file")
    ds = _open(tmp_path, path="docs")
    assert ds["text"][:] == TEXTS


def test_glob(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    _jsonl(folder / "part-1.jsonl", ROWS[:1])
    _jsonl(folder / "part-2.jsonl", ROWS[1:])
    _jsonl(folder / "other.jsonl", [{"text": "not me"}])
    ds = _open(tmp_path, path="docs/part-*.jsonl")
    assert ds["text"][:] == TEXTS


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(CorpusError, match="matches no file"):
        _open(tmp_path, path="docs/*.jsonl")


def test_folder_without_corpus_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("x")
    with pytest.raises(CorpusError, match="holds no"):
        _open(tmp_path, path="docs")


def test_mixed_formats_need_explicit_format(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    _jsonl(folder / "a.jsonl", ROWS)
    (folder / "b.txt").write_text("x\n")
    with pytest.raises(CorpusError, match="corpus.format"):
        _open(tmp_path, path="docs")


def test_explicit_format_overrides_suffix(tmp_path):
    _jsonl(tmp_path / "c.data", ROWS)
    with pytest.raises(CorpusError, match="corpus.format"):
        _open(tmp_path, path="c.data")
    assert _open(tmp_path, path="c.data", format="json")["text"][:] == TEXTS


def test_save_to_disk_dataset(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    ds = _open(tmp_path, path="saved")
    assert ds["text"][:] == TEXTS and ds.column_names == ["text", "id", "topic"]


def test_save_to_disk_dataset_dict_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS[1:])}).save_to_disk(str(tmp_path / "saved"))
    assert _open(tmp_path, path="saved")["text"][:] == TEXTS[:1]
    assert _open(tmp_path, path="saved", split="test")["text"][:] == TEXTS[1:]
    with pytest.raises(CorpusError, match="no split 'validation'") as info:
        _open(tmp_path, path="saved", split="validation")
    assert "train" in str(info.value) and "test" in str(info.value)


def test_absolute_path_ignores_base_dir(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", ROWS)
    ds = open_corpus(CorpusSpec(path=str(path)), tmp_path / "elsewhere")
    assert len(ds) == 3


def test_limit(tmp_path):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    assert _open(tmp_path, path="c.jsonl", limit=2)["text"][:] == TEXTS[:2]
    assert len(_open(tmp_path, path="c.jsonl", limit=100)) == 3


# --- columns and ids -------------------------------------------------------------------------

def test_text_id_and_metadata_columns(tmp_path):
    rows = [{"body": r["text"], "key": i * 10, "topic": r["topic"], "n": i} for i, r in enumerate(ROWS)]
    _jsonl(tmp_path / "c.jsonl", rows)
    spec = CorpusSpec(path="c.jsonl", text_column="body", id_column="key", metadata_columns=["topic", "n"])
    corpus = _corpus(tmp_path, spec)
    rows = np.arange(len(corpus))
    assert corpus.texts(rows) == TEXTS
    assert corpus.doc_ids == ["0", "10", "20"]
    assert {k: v.to_pylist() for k, v in corpus.metadata(rows).items()} == {
        "topic": ["pets", "weather", "rivers"], "n": [0, 1, 2]}
    assert corpus.metadata_schema().names == ["topic", "n"]


def test_doc_id_without_id_column_is_sha1_prefix(tmp_path):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    spec = CorpusSpec(path="c.jsonl")
    first = _corpus(tmp_path, spec).doc_ids
    assert first == [_sha16(t) for t in TEXTS]
    assert all(len(i) == 16 for i in first)
    # Stable: the same text gets the same id from another file, order and shard.
    _jsonl(tmp_path / "d.jsonl", list(reversed(ROWS)))
    d = _corpus(tmp_path, CorpusSpec(path="d.jsonl"))
    second = d.shard(1, *contiguous(len(d), 2)[1]).doc_ids
    assert second and set(second) <= set(first)


@pytest.mark.parametrize("key, spec, missing", [
    ("corpus.text_column", {"text_column": "body"}, "body"),
    ("corpus.id_column", {"id_column": "ident"}, "ident"),
    ("corpus.metadata_columns", {"metadata_columns": ["topic", "lang"]}, "lang"),
])
def test_unknown_column_names_column_and_lists_available(tmp_path, key, spec, missing):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(CorpusError) as info:
        _open(tmp_path, path="c.jsonl", **spec)
    message = str(info.value)
    assert key in message
    assert repr(missing) in message
    assert "columns: text, id, topic" in message


# --- errors ----------------------------------------------------------------------------------

def _empty_csv(d):
    (d / "c.csv").write_text("text,id\n", encoding="utf-8")
    return "c.csv"


def _empty_jsonl(d):
    (d / "c.jsonl").write_text("", encoding="utf-8")
    return "c.jsonl"


def _empty_txt(d):
    (d / "c.txt").write_text("", encoding="utf-8")
    return "c.txt"


def _empty_parquet(d):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "c.parquet")
    return "c.parquet"


def _empty_saved(d):
    features = datasets.Features({"text": datasets.Value("string")})
    datasets.Dataset.from_dict({"text": []}, features=features).save_to_disk(str(d / "saved"))
    return "saved"


EMPTY = pytest.mark.parametrize("make", [_empty_csv, _empty_jsonl, _empty_txt, _empty_parquet, _empty_saved],
                                ids=["csv-header-only", "jsonl", "txt", "parquet", "save_to_disk"])


@EMPTY
def test_empty_corpus_raises_corpus_error(tmp_path, make):
    """Not a raw datasets/pyarrow exception (the CLI would show a traceback)."""
    name = make(tmp_path)
    with pytest.raises(CorpusError) as info:
        _open(tmp_path, path=name)
    assert name in str(info.value)


@EMPTY
def test_empty_corpus_message_says_it_has_no_rows(tmp_path, make):
    name = make(tmp_path)
    with pytest.raises(Exception) as info:
        _open(tmp_path, path=name)
    message = str(info.value)
    said = message.replace(str(tmp_path / name), "").replace(name, "").lower()
    assert "no rows" in said or "empty" in said, message


def test_missing_file_absolute(tmp_path):
    with pytest.raises(CorpusError, match="not found") as info:
        _open(tmp_path, path=str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(info.value)


@pytest.mark.parametrize("path", ["./nope.jsonl", "data/nope.jsonl", "data/sub/nope.jsonl"])
def test_missing_file_relative(tmp_path, path):
    with pytest.raises(CorpusError, match="not found") as info:
        _open(tmp_path, path=path)
    assert "nope.jsonl" in str(info.value)


@pytest.mark.parametrize("name, content, line", [
    ("c.txt", b"fine\nalso fine\nbad \xff byte\n", 3),
    ("c.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
    ("c.csv", b"text\nok\nok\nok\n\xc3(\n", 5),
])
def test_non_utf8_names_file_and_line(tmp_path, name, content, line):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match="not valid UTF-8") as info:
        _open(tmp_path, path=name)
    assert str(tmp_path / name) in str(info.value)
    assert f"line {line}" in str(info.value)


def test_non_utf8_file_in_folder_is_named(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("good\n", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"\xff\n")
    with pytest.raises(CorpusError) as info:
        _open(tmp_path, path="docs")
    assert str(folder / "b.txt") in str(info.value) and "line 1" in str(info.value)


def test_utf8_with_multibyte_across_lines_is_fine(tmp_path):
    text = ["café ünïcödé", "日本語のテキスト", "emoji 🙂 ok"]
    (tmp_path / "c.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    assert _open(tmp_path, path="c.txt")["text"][:] == text


# --- sharding --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards", [1, 3, 4, 7, 25])
def test_sharding_deterministic_and_complete(tmp_path, num_shards):
    rows = [{"text": f"document number {i}", "id": str(i)} for i in range(23)]
    _jsonl(tmp_path / "c.jsonl", rows)
    spec = CorpusSpec(path="c.jsonl", id_column="id")
    corpus = _corpus(tmp_path, spec)
    plan = contiguous(len(corpus), num_shards)
    assert len(plan) == min(num_shards, 23)  # never a shard past the last row
    shards = [corpus.shard(s, *plan[s]) for s in range(len(plan))]
    first = [s.doc_ids for s in shards]
    again = _corpus(tmp_path, spec)
    second = [again.shard(s, *plan[s]).doc_ids for s in range(len(plan))]
    assert first == second
    assert [s.fingerprint for s in shards] == [again.shard(s, *plan[s]).fingerprint for s in range(len(plan))]
    union = [i for shard in first for i in shard]
    assert sorted(union, key=int) == [str(i) for i in range(23)]
    assert len(union) == len(set(union)) == 23
    # Contiguous row ranges, sizes differing by at most one; each shard walked in doc_id order.
    rows = [sorted(s.rows.tolist()) for s in shards]
    assert [r for shard in rows for r in shard] == list(range(23))
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:
        assert s.doc_ids == sorted(s.doc_ids)
        assert s.doc_ids == [corpus.doc_ids[r] for r in s.rows]


# --- empty documents in a run ----------------------------------------------------------------

def test_empty_documents_counted_without_token_rows(tmp_path, tiny_model_dir):
    rows = [{"text": "A real sentence about cats.", "id": "a"}, {"text": "", "id": "empty"},
            {"text": "   \n\t ", "id": "blank"}, {"text": "Another real one.", "id": "b"}]
    _jsonl(tmp_path / "c.jsonl", rows)
    job = load_job(write_job(tmp_path, tmp_path / "c.jsonl", model=tiny_model_dir("bert"),
                             extra='id_column = "id"', num_shards=2, device="cpu"))
    summary = run_job(job, quiet=True)
    assert summary.totals["documents"] == 4
    assert summary.totals["empty_documents"] == 2
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert sum(s["empty_documents"] for s in manifest["shards"].values()) == 2

    docs = open_table(tmp_path / "out", "documents").to_table().to_pylist()
    by_id = {d["doc_id"]: d for d in docs}
    assert sorted(by_id) == ["a", "b", "blank", "empty"]
    for doc_id in ("empty", "blank"):
        assert by_id[doc_id]["empty"] is True
        assert by_id[doc_id]["windows"] == 0 and by_id[doc_id]["content_tokens"] == 0
    for doc_id in ("a", "b"):
        assert by_id[doc_id]["empty"] is False and by_id[doc_id]["windows"] == 1

    for table in ("tokens", "head_stats"):
        ids = set(open_table(tmp_path / "out", table).to_table(columns=["doc_id"]).column("doc_id").to_pylist())
        assert ids == {"a", "b"}, table


def test_documents_table_ids_are_sha1_without_id_column(tmp_path, tiny_model_dir):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    job = load_job(write_job(tmp_path, tmp_path / "c.jsonl", model=tiny_model_dir("bert"),
                             extra='metadata_columns = ["topic"]', device="cpu"))
    run_job(job, quiet=True)
    docs = open_table(tmp_path / "out", "documents").to_table().to_pylist()
    assert sorted(d["doc_id"] for d in docs) == sorted(_sha16(t) for t in TEXTS)
    assert {d["doc_id"]: d["topic"] for d in docs} == {_sha16(r["text"]): r["topic"] for r in ROWS}
    assert all(d["text_sha1"] == hashlib.sha1(t.encode()).hexdigest()
               for d in docs for t in TEXTS if _sha16(t) == d["doc_id"])
    assert {d["doc_id"]: d["corpus_row"] for d in docs} == {_sha16(t): i for i, t in enumerate(TEXTS)}
    assert all(d["occurrence"] == 1 for d in docs)
