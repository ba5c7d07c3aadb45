"""The corpus cache: local files read a batch at a time into a memory-mapped Arrow file, reused
by the next open, rebuilt when a file or the spec changes, never left half-written looking
complete, and a private file where the cache folder cannot be written. Memory boundedness is
checked by counting rows per batch (module constants made tiny), never by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import datasets
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from attnpipe import corpus_cache, corpus_files
from attnpipe.corpus import Corpus, open_corpus
from attnpipe.errors import CorpusError
from attnpipe.job import CorpusSpec

ROWS = [{"text": f"document number {i}", "id": f"d{i}", "n": i} for i in range(20)]
OLD_NS = 1_600_000_000 * 10**9  # a file time long past: the file is not "racy" (see corpus_cache)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ATTNPIPE_CACHE", str(folder))
    return folder / "corpus"


@pytest.fixture
def reads(monkeypatch):
    """Counts the files each open reads (JSON, text and CSV readers)."""
    calls = []
    for name in ("read_json", "read_text", "read_csv"):
        real = getattr(corpus_files, name)
        monkeypatch.setattr(corpus_files, name, lambda path, *a, _real=real, **k: calls.append(path) or _real(path, *a, **k))
    return calls


def _jsonl(path, rows, mtime_ns=OLD_NS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _open(base, **spec):
    return open_corpus(CorpusSpec(**spec), base)


def _cache_batches(cache) -> list[int]:
    """Rows of each record batch in the one cache file."""
    (arrow,) = cache.glob("*.arrow")
    return [b.num_rows for b in ipc.open_stream(pa.memory_map(str(arrow)))]


# --- reuse and invalidation ----------------------------------------------------------------------

@pytest.fixture
def settled(monkeypatch):
    """Files written by a test count as settled (their ctime cannot be set into the past)."""
    monkeypatch.setattr(corpus_cache, "RACY_NS", 0)


def test_second_open_maps_the_cache_without_reading(tmp_path, cache, reads, settled):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    first = _open(tmp_path, path="c.jsonl", id_column="id", metadata_columns=["n"])
    assert len(reads) == 1 and len(list(cache.glob("*.arrow"))) == 1 and len(list(cache.glob("*.json"))) == 1
    second = _open(tmp_path, path="c.jsonl", id_column="id", metadata_columns=["n"])
    assert len(reads) == 1  # not read again
    assert isinstance(second.data, datasets.table.MemoryMappedTable)
    assert second.data.table.equals(first.data.table) and second["text"] == [r["text"] for r in ROWS]
    spec = CorpusSpec(path="c.jsonl", id_column="id")
    assert Corpus(_open(tmp_path, path="c.jsonl", id_column="id"), spec).doc_ids == [r["id"] for r in ROWS]


@pytest.mark.parametrize("change", ["same size, new mtime", "appended"])
def test_a_changed_file_is_read_again(tmp_path, cache, reads, settled, change):
    path = _jsonl(tmp_path / "c.jsonl", ROWS)
    _open(tmp_path, path="c.jsonl")
    rows = [dict(r, text=r["text"].replace("number", "NUMBER")) for r in ROWS] if change.startswith("same") \
        else ROWS + [{"text": "one more"}]
    _jsonl(path, rows, mtime_ns=OLD_NS + 10**9)
    ds = _open(tmp_path, path="c.jsonl")
    assert len(reads) == 2 and ds["text"] == [r["text"] for r in rows]


def test_a_changed_spec_is_read_again(tmp_path, cache, reads, settled):
    (tmp_path / "c.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    os.utime(tmp_path / "c.txt", ns=(OLD_NS, OLD_NS))
    assert _open(tmp_path, path="c.txt")["text"] == ["one", "two", "three"]
    assert _open(tmp_path, path="c.txt", text_unit="paragraph")["text"] == ["one\ntwo", "three"]
    assert _open(tmp_path, path="c.txt", text_unit="paragraph")["text"] == ["one\ntwo", "three"]
    assert len(reads) == 2


def test_a_just_written_file_is_not_cached(tmp_path, cache, reads):
    """Its mtime could stay the same through a change made right after the read (coarse clocks)."""
    _jsonl(tmp_path / "c.jsonl", ROWS, mtime_ns=time.time_ns())
    _open(tmp_path, path="c.jsonl")
    ds = _open(tmp_path, path="c.jsonl")
    assert len(reads) == 2 and not list(cache.glob("*.arrow")) and not list(cache.glob("*.part"))
    assert isinstance(ds.data, datasets.table.InMemoryTable) and len(ds) == len(ROWS)


# --- never half-written ---------------------------------------------------------------------------

def test_a_killed_reader_leaves_nothing_that_looks_complete(tmp_path, cache, reads, settled):
    """A reader SIGKILLed midway leaves a .part file; the next open ignores it and builds."""
    _jsonl(tmp_path / "c.jsonl", ROWS)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from attnpipe import corpus_cache, corpus_files
        from attnpipe.corpus import open_corpus
        from attnpipe.job import CorpusSpec
        corpus_cache.RACY_NS = 0
        corpus_files.BATCH_ROWS = 2
        write = corpus_cache.BatchSink.write
        def dying(self, batch):
            if self.batches == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            write(self, batch)
        corpus_cache.BatchSink.write = dying
        open_corpus(CorpusSpec(path="c.jsonl"), Path({str(tmp_path)!r}))
    """)
    env = dict(os.environ, ATTNPIPE_CACHE=str(cache.parent))
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -9
    assert list(cache.glob("*.part")) and not list(cache.glob("*.json")) and not list(cache.glob("*.arrow"))
    ds = _open(tmp_path, path="c.jsonl")
    assert len(reads) == 1 and ds["text"] == [r["text"] for r in ROWS]


def test_a_damaged_or_incomplete_entry_is_rebuilt(tmp_path, cache, reads, settled):
    _jsonl(tmp_path / "c.jsonl", ROWS)
    _open(tmp_path, path="c.jsonl")
    (arrow,) = cache.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:200])  # truncated
    assert _open(tmp_path, path="c.jsonl")["text"] == [r["text"] for r in ROWS]
    with open(arrow, "ab") as f:  # a file that is not the one recorded
        f.write(b"\0" * 8)
    assert _open(tmp_path, path="c.jsonl")["text"] == [r["text"] for r in ROWS]
    arrow.with_suffix(".json").unlink()  # renamed into place, but its record never written
    assert _open(tmp_path, path="c.jsonl")["text"] == [r["text"] for r in ROWS]
    assert len(reads) == 4


def test_an_error_while_reading_leaves_no_file(tmp_path, cache, settled):
    _jsonl(tmp_path / "c.jsonl", ROWS + [{"text": 5}])
    with pytest.raises(CorpusError, match="line 21"):
        _open(tmp_path, path="c.jsonl")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_old_part_files_are_swept(tmp_path, cache, settled):
    cache.mkdir(parents=True)
    old, young = cache / "dead.123.ab.part", cache / "live.456.cd.part"
    for p in (old, young):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * corpus_cache.STALE_PART_S,) * 2)
    _jsonl(tmp_path / "c.jsonl", ROWS)
    _open(tmp_path, path="c.jsonl")
    assert not old.exists() and young.exists()


def test_an_unwritable_cache_falls_back_to_a_private_file(tmp_path, monkeypatch, reads, settled):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ATTNPIPE_CACHE", str(blocker))
    _jsonl(tmp_path / "c.jsonl", ROWS)
    ds = _open(tmp_path, path="c.jsonl", id_column="id")
    assert ds["text"] == [r["text"] for r in ROWS] and isinstance(ds.data, datasets.table.InMemoryTable)


# --- a batch at a time ----------------------------------------------------------------------------

def test_batches_hold_at_most_batch_rows(tmp_path, cache, monkeypatch, settled):
    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 3)
    written = []
    real = corpus_cache.BatchSink.write
    monkeypatch.setattr(corpus_cache.BatchSink, "write", lambda self, b: written.append(b.num_rows) or real(self, b))
    _jsonl(tmp_path / "c.jsonl", ROWS)
    ds = _open(tmp_path, path="c.jsonl", id_column="id")
    assert max(written) == 3 and sum(written) == len(ROWS) and max(_cache_batches(cache)) == 3
    assert ds["id"] == [r["id"] for r in ROWS]


@pytest.mark.parametrize("name", ["c.txt", "c.csv"])
def test_batches_hold_at_most_batch_bytes_of_text(tmp_path, cache, monkeypatch, settled, name):
    monkeypatch.setattr(corpus_files, "BATCH_BYTES", 250)
    texts = [f"{i:03d} " + "x" * 96 for i in range(12)]  # 100 characters each
    body = "\n".join(texts) + "\n"
    (tmp_path / name).write_text(("text\n" + body) if name.endswith(".csv") else body, encoding="utf-8")
    os.utime(tmp_path / name, ns=(OLD_NS, OLD_NS))
    ds = _open(tmp_path, path=name)
    assert ds["text"] == texts
    assert max(_cache_batches(cache)) <= 3


def test_paragraphs_and_lines_across_read_boundaries(tmp_path, cache, monkeypatch, settled):
    """Reads of 7 bytes cut lines, \\r\\n pairs, multibyte characters and paragraphs."""
    monkeypatch.setattr(corpus_files, "READ_BYTES", 7)
    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 1)
    raw = "\ufeffFirst paragraph, line one\r\nline two: café 日本\r\n\r\n\r\nSecond\rstill second\n\nthird 🙂"
    (tmp_path / "c.txt").write_bytes(raw.encode("utf-8"))
    ds = _open(tmp_path, path="c.txt", text_unit="paragraph")
    assert ds["text"] == ["First paragraph, line one\nline two: café 日本", "Second\nstill second", "third 🙂"]
    assert ds[corpus_files.SOURCE_INDEX] == [1, 2, 3]
    lines = _open(tmp_path, path="c.txt", text_unit="line")
    assert lines[corpus_files.SOURCE_INDEX] == [1, 2, 5, 6, 8]


def test_a_bad_byte_past_the_first_read_is_located(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_files, "READ_BYTES", 5)
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"not valid UTF-8: byte 45 \(line 3\)"):
        _open(tmp_path, path="c.jsonl")


# --- types unified over a file's batches ----------------------------------------------------------

def test_json_numbers_widen_and_structs_merge_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 2)
    rows = [{"text": "a", "n": 1, "m": {"x": 1}}, {"text": "b", "n": 2, "m": None},
            {"text": "c", "n": 2.5, "m": {"y": "z"}}, {"text": "d"}]
    _jsonl(tmp_path / "c.jsonl", rows)
    ds = _open(tmp_path, path="c.jsonl", metadata_columns=["n", "m"])
    assert ds.data.table.schema.field("n").type == pa.float64() and ds["n"] == [1.0, 2.0, 2.5, None]
    assert ds["m"] == [{"x": 1, "y": None}, None, {"x": None, "y": "z"}, None]


def test_json_mixed_types_across_batches_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 2)
    _jsonl(tmp_path / "c.jsonl", [{"text": "a", "n": 1}, {"text": "b"}, {"text": "c", "n": "x"}])
    with pytest.raises(CorpusError, match=r"'n' mixes types: a number \(line 1\) and a string \(line 3\)"):
        _open(tmp_path, path="c.jsonl", metadata_columns=["n"])
    _jsonl(tmp_path / "c.jsonl", [{"text": "a", "n": [1]}, {"text": "b"}, {"text": "c", "n": ["x"]}])
    with pytest.raises(CorpusError, match="column 'n' cannot be stored as one Arrow type"):
        _open(tmp_path, path="c.jsonl", metadata_columns=["n"])


def test_csv_column_typed_differently_by_two_batches_is_read_as_text(tmp_path, monkeypatch):
    """As pandas types a whole file: numbers, then a word, make the column text (exact text)."""
    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 2)
    (tmp_path / "c.csv").write_text("text,k,f\na,01,1\nb,2,2\nc,x,\nd,,2.5\n", encoding="utf-8")
    ds = _open(tmp_path, path="c.csv", metadata_columns=["k", "f"])
    assert ds["k"] == ["01", "2", "x", None] and ds["f"] == [1.0, 2.0, None, 2.5]


def test_column_types_differing_between_files_name_both(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 1)
    (tmp_path / "docs").mkdir()
    _jsonl(tmp_path / "docs" / "a.jsonl", [{"text": "a"}, {"text": "b", "n": 1}])
    _jsonl(tmp_path / "docs" / "b.jsonl", [{"text": "c", "n": 1.5}])
    with pytest.raises(CorpusError, match=r"'n' holds int64 values in .*a.jsonl but double in .*b.jsonl"):
        _open(tmp_path, path="docs", metadata_columns=["n"])


def test_a_big_json_list_is_refused_with_the_command_that_streams_it(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_files, "JSON_LIST_MAX_BYTES", 10)
    (tmp_path / "c.json").write_text(json.dumps(ROWS), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"one JSON list of 0\.0 MiB.*\(jq -c '\.\[\]' c.json > c.jsonl\)"):
        _open(tmp_path, path="c.json")


# --- Corpus: per-row arrays, ids as before ---------------------------------------------------------

def test_hash_ids_and_repeats_match_a_dict_count(tmp_path, monkeypatch):
    """Occurrence counted by sorting digests equals counting each text in row order."""
    import hashlib
    import random

    monkeypatch.setattr(corpus_files, "BATCH_ROWS", 7)
    rng = random.Random(0)
    texts = [rng.choice(["a", "b", "c", "", "d e", "f"]) + str(rng.randint(0, 3)) for _ in range(200)]
    _jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    corpus = Corpus(_open(tmp_path, path="c.jsonl"), CorpusSpec(path="c.jsonl"))
    seen, expected = {}, []
    for t in texts:
        seen[t] = seen.get(t, 0) + 1
        sha = hashlib.sha1(t.encode()).hexdigest()
        expected.append(sha[:16] if seen[t] == 1 else f"{sha[:16]}-{seen[t]}")
    assert corpus.doc_ids == expected and corpus.text_sha1 == [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    shard = corpus.shard(0, 50, 120)
    assert shard.doc_ids == sorted(expected[50:120]) and shard.doc_ids == [expected[r] for r in shard.rows]
    assert shard.text_sha1 == [corpus.text_sha1[r] for r in shard.rows]


def test_repeats_are_told_apart_by_the_whole_digest():
    """Rows whose digests share the first 8 bytes (the sort key) but differ later are not repeats."""
    import numpy as np

    from attnpipe.corpus import _occurrence

    digests = np.zeros((6, 20), np.uint8)
    digests[:, 19] = [1, 2, 1, 2, 3, 1]  # same first 8 bytes everywhere
    assert _occurrence(digests).tolist() == [1, 1, 2, 2, 1, 3]
    assert _occurrence(np.zeros((0, 20), np.uint8)).tolist() == []
