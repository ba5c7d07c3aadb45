"""What hostile probing of the read side and `verify` found (issue 12), one test per finding:
files outside the dataset through DuckDB's temp folder, -o into the dataset, damaged files read
as good data, malformed or edited commit records, the report's JSON block, tracebacks and
unclear refusals, and the small things (number alignment, --max-width, schema types, SVG text,
empty documents)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from attnpipe.errors import OutputError
from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.read import open_dataset
from attnpipe.store import committed_files
from attnpipe.store.verify import check_committed, parquet_format

from conftest import invoke, one_line_error, write_job

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture
def out(data, tmp_path) -> Path:
    """A private copy of the dense dataset, free to damage."""
    copy = tmp_path / "out"
    shutil.copytree(data["dense"], copy)
    return copy


def record(out: Path, shard: int = 0) -> Path:
    return out / "_commits" / f"shard-{shard:05d}.json"


def edit_record(out: Path, change, shard: int = 0) -> None:
    path = record(out, shard)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def flip(path: Path, pos: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    pos = len(data) // 2 if pos is None else pos
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))


# --- 1. query reads nothing but the dataset -------------------------------------------------------

def test_query_cannot_read_the_current_folders_tmp(data, tmp_path, monkeypatch):
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("secret,value\nhunter2,1\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("query", data["dense"], "SELECT * FROM read_csv('.tmp/secret.csv')")
    assert "refused: reading .tmp/secret.csv" in one_line_error(result)
    assert "hunter2" not in result.output


def test_query_cannot_read_through_a_tmp_symlink(data, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "passwd").write_text("root:x:0:0:hunter2\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".tmp").symlink_to(elsewhere)
    monkeypatch.chdir(work)
    for sql in ("SELECT * FROM read_csv('.tmp/passwd')", "SELECT * FROM read_text('.tmp/passwd')",
                f"SELECT * FROM read_text('{work}/.tmp/passwd')", "SELECT * FROM glob('.tmp/*')"):
        result = invoke("query", data["dense"], sql)
        assert "refused" in one_line_error(result) and "hunter2" not in result.output, sql


def test_duckdb_temp_folder_is_private_and_removed(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = open_dataset(data["dense"])
    temp = Path(ds.sql("SELECT current_setting('temp_directory') AS t")["t"][0])
    assert temp.is_absolute() and temp.is_dir() and tmp_path not in (temp, *temp.parents)
    assert (temp.stat().st_mode & 0o777) == 0o700 and not any(temp.iterdir())
    ds.close()
    assert not temp.exists()


# --- 2. -o never writes into the dataset ----------------------------------------------------------

@pytest.mark.parametrize("target", ["_commits/shard-00000.json", "committed", "new.csv", "tokens/x.csv"])
def test_query_out_inside_the_dataset_is_refused(out, target):
    path = committed_files(out, "edges")[0] if target == "committed" else out / target
    before = path.read_bytes() if path.exists() else None
    result = invoke("query", out, "SELECT * FROM edges", "--format", "csv", "-o", path)
    assert "inside the dataset folder" in one_line_error(result)
    assert (path.read_bytes() if path.exists() else None) == before
    assert invoke("verify", out).exit_code == 0


def test_out_through_a_symlink_into_the_dataset_is_refused(out, tmp_path):
    link = tmp_path / "results"
    link.symlink_to(out / "_commits")
    result = invoke("query", out, "SELECT 1 AS a", "--format", "json", "-o", link / "shard-00000.json")
    assert "inside the dataset folder" in one_line_error(result)
    file_link = tmp_path / "result.parquet"
    file_link.symlink_to(committed_files(out, "tokens")[0])
    result = invoke("query", out, "SELECT 1 AS a", "--format", "parquet", "-o", file_link)
    assert "inside the dataset folder" in one_line_error(result)
    assert invoke("verify", out).exit_code == 0


def test_other_read_commands_refuse_out_inside_the_dataset(out):
    pytest.importorskip("matplotlib")
    for args in (["heads", out, "--format", "csv", "-o", out / "atlas.csv"],
                 ["plot", out, "--grid", "entropy_norm", "-o", out / "grid.png"],
                 ["report", out, "-o", out / "_commits" / "r.html"]):
        assert "inside the dataset folder" in one_line_error(invoke(*args)), args
    assert not list(out.glob("*.csv")) and not list(out.glob("*.png"))


def test_out_onto_a_hard_link_replaces_the_link_not_the_committed_file(out, tmp_path):
    committed = committed_files(out, "tokens")[0]
    link = tmp_path / "link.csv"
    os.link(committed, link)
    assert invoke("query", out, "SELECT 1 AS a", "--format", "csv", "-o", link).exit_code == 0
    assert link.read_text().startswith('"a"') and invoke("verify", out).exit_code == 0


# --- 3. damaged files are never read as good data -------------------------------------------------

@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_query_on_a_damaged_file_says_damaged(out, damage):
    victim = committed_files(out, "edges")[-1]
    if damage == "flip":
        flip(victim)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    line = one_line_error(invoke("query", out, "SELECT count(*) FROM edges"))
    assert "is damaged" in line and "attnpipe verify" in line and victim.name in line
    assert invoke("verify", out).exit_code == 1
    assert "damaged" in invoke("inspect", out).output.splitlines()[0]


def test_python_api_checks_before_duckdb_reads(out):
    flip(committed_files(out, "edges")[0])
    ds = open_dataset(out)
    with pytest.raises(OutputError, match="damaged .*attnpipe verify"):
        ds.sql("SELECT count(*) FROM edges")


def test_damaged_file_found_even_after_a_clean_check_in_the_process(out):
    ds = open_dataset(out)
    assert check_committed(out, ds.records) > 0
    assert check_committed(out, ds.records) == 0  # verified (path, size, mtime) are not hashed again
    victim = committed_files(out, "tokens")[0]
    flip(victim)  # a rewrite changes the mtime
    with pytest.raises(OutputError, match="damaged .*sha256.*attnpipe verify"):
        check_committed(out, ds.records)


def test_verified_files_are_remembered_across_processes(out, monkeypatch):
    """A later command (a new process: the in-process set is empty) does not hash again what
    an earlier one verified, until a file changes."""
    import attnpipe.store.verified as verified

    records = open_dataset(out).records
    assert check_committed(out, records) > 0
    monkeypatch.setattr(verified, "_VERIFIED", set())
    monkeypatch.setattr(verified, "_LOADED", set())
    assert check_committed(out, records) == 0  # from the cache file
    victim = committed_files(out, "tokens")[0]
    flip(victim)
    monkeypatch.setattr(verified, "_VERIFIED", set())
    monkeypatch.setattr(verified, "_LOADED", set())
    with pytest.raises(OutputError, match="damaged"):
        check_committed(out, records)


def test_rerun_recovery_hashes_only_files_not_verified_before(out, monkeypatch):
    """recover() (every rerun) compares sha256 but skips files a reader or an earlier run already
    verified; a changed file is still found."""
    import attnpipe.store.verified as verified
    from attnpipe.store.dataset import recover

    hashed = []
    real = verified.sha256_of
    monkeypatch.setattr(verified, "sha256_of", lambda p: (hashed.append(p), real(p))[1])
    n = len(recover(out))
    first = len(hashed)
    assert first == len(committed_files(out))
    monkeypatch.setattr(verified, "_VERIFIED", set())  # a new process ...
    monkeypatch.setattr(verified, "_LOADED", set())
    assert len(recover(out)) == n and len(hashed) == first  # ... hashes nothing again
    flip(committed_files(out, "tokens")[0])
    assert len(recover(out)) == n - 1 and len(hashed) == first + 1


def test_hash_budget_bounds_the_readers_check(out):
    records = open_dataset(out).records
    assert check_committed(out, records, budget=0) == 0  # sizes only
    committed_files(out, "tokens")[0].write_bytes(b"x")
    with pytest.raises(OutputError, match="bytes, its record says"):
        check_committed(out, records, budget=0)


def test_pages_carry_checksums_that_pyarrow_verifies(out):
    victim = committed_files(out, "edges")[0]
    meta = pq.ParquetFile(victim).metadata
    column = meta.row_group(0).column(meta.schema.names.index("key_pos"))
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    # The last byte of the column chunk lies in its last page's payload, which the CRC covers
    # (without the check, this flip of a delta-encoded key_pos reads as other numbers).
    flip(victim, start + column.total_compressed_size - 1)
    with pytest.raises(OSError, match="CRC"):
        pads.dataset([str(victim)], format=parquet_format()).to_table()


def test_rerun_redoes_a_shard_whose_bytes_changed(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One text.", "Two texts here.")))
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), device="cpu", num_shards=2)
    first = run_job(load_job(job), quiet=True)
    victim = next(p for p in committed_files(first.output, "head_stats") if "shard-00001-" in p.name)
    flip(victim)
    assert "damaged" in invoke("inspect", first.output).output.splitlines()[0]
    again = run_job(load_job(job), quiet=True)
    assert again.shards_run == [1] and again.shards_skipped == [0]
    assert invoke("verify", first.output).exit_code == 0


# --- 4. records that lie, and paths that are no dataset -------------------------------------------

def test_a_file_listed_twice_is_refused(out):
    edit_record(out, lambda r: r["files"].append(dict(r["files"][-1])))
    assert "a second time" in one_line_error(invoke("query", out, "SELECT count(*) FROM edges"))
    result = invoke("verify", out)
    assert result.exit_code == 1 and "a second time" in result.output
    with pytest.raises(OutputError, match="shard-00000.json.*a second time"):
        open_dataset(out)


def test_a_file_listed_by_two_records_is_refused(out):
    other = json.loads(record(out, 0).read_text())["files"][0]
    edit_record(out, lambda r: r["files"].append(other) or r["rows"].update(
        {other["table"]: r["rows"][other["table"]] + other["rows"]}) or r.update(
        {"documents": r["documents"] + other["rows"]}), shard=1)
    assert "both list" in one_line_error(invoke("query", out, "SELECT count(*) FROM documents"))
    result = invoke("verify", out)
    assert result.exit_code == 1 and "lists too" in result.output


@pytest.mark.parametrize("key, value", [("rows", "edges+1"), ("documents", 99), ("tokens", 1)])
def test_edited_totals_fail_verify_and_status(out, key, value):
    def change(r):
        if key == "rows":
            r["rows"]["edges"] += 1
        else:
            r[key] = value
    edit_record(out, change)
    result = invoke("verify", out)
    assert result.exit_code == 1 and "shard-00000.json" in result.output
    assert "files hold" in one_line_error(invoke("status", out))


@pytest.mark.parametrize("where", ["missing", "empty", "source tree"])
def test_verify_fails_on_what_is_no_dataset(tmp_path, where):
    path = {"missing": tmp_path / "nope", "empty": tmp_path, "source tree": REPO}[where]
    line = one_line_error(invoke("verify", path))
    assert str(path) in line and ("not an attnpipe output" in line or "does not exist" in line)


def test_verify_reports_a_deleted_dataset_json(out):
    (out / "_dataset.json").unlink()
    result = invoke("verify", out)
    assert result.exit_code == 1 and "_dataset.json: missing" in result.output


# --- 5. malformed records: one line naming the record and the key ---------------------------------

MALFORMED = {
    "files null": (lambda r: r.update(files=None), "key 'files'"),
    "file without table": (lambda r: r["files"][0].pop("table"), "files[0] has no key 'table'"),
    "shard two": (lambda r: r.update(shard="two"), "key 'shard'"),
    "path escapes": (lambda r: r["files"][0].update(path="../../etc/passwd"), "files[0].path"),
    "rows not a dict": (lambda r: r.update(rows=[1]), "key 'rows'"),
    "bytes text": (lambda r: r["files"][1].update(bytes="10"), "files[1].bytes"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_record_is_one_line_everywhere(out, name, tmp_path):
    change, named = MALFORMED[name]
    edit_record(out, change)
    for args in (["query", out, "SELECT 1"], ["inspect", out], ["status", out], ["heads", out]):
        line = one_line_error(invoke(*args))
        assert "shard-00000.json" in line and named in line, (args, line)
    result = invoke("verify", out)
    assert result.exit_code == 1 and "Traceback" not in result.output and named in result.output
    # a run into this folder reads the records first: one line, before any model loads
    line = one_line_error(invoke("run", REPO / "jobs" / "demo.toml", "-o", out, "--dry-run"))
    assert "shard-00000.json" in line and named in line


def test_record_under_another_shards_name_is_refused(out):
    shutil.copy(record(out, 1), out / "_commits" / "shard-00007.json")
    assert "not the shard of its file name" in one_line_error(invoke("query", out, "SELECT 1"))


# --- 6. the report's JSON block -------------------------------------------------------------------

HOSTILE = {
    "<!--<script>": "The first text. </script><script>alert(1)</script>",
    "</script><b>x</b>": "A second text with --> and <!-- inside.",
    "line\u2028sep\u2029": "Third text \u2028 with separators & ampersands.",
    "empty-doc": "",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in HOSTILE.items()))
    recipes = ('[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 3\n'
               '[[recipes]]\nname = "dense"\nmax_tokens = 64\n')
    job = write_job(folder, corpus, tiny_model_dir("bert"), recipes=recipes, extra='id_column = "id"', device="cpu")
    return run_job(load_job(job), quiet=True).output


def test_report_json_block_survives_hostile_ids_and_texts(hostile):
    pytest.importorskip("matplotlib")
    from attnpipe.read.report import build_report

    ds = open_dataset(hostile)
    ids = [i for i, t in HOSTILE.items() if t]
    text = build_report(ds, ids)
    block = re.search(r'<script type="application/json" id="hv-data">(.*?)</script>', text, re.S).group(1)
    assert "<" not in block and ">" not in block and "\u2028" not in block and "\u2029" not in block
    docs = json.loads(block)["docs"]
    assert [d["doc_id"] for d in docs] == ids and all(d["views"] for d in docs)
    # nothing of the ids escaped the block: the only scripts are ours
    assert text.count("<script") == 2 and "alert(1)" not in text


def test_script_json_round_trips():
    from attnpipe.read.report import script_json

    data = {"a": "</script><!--<script>-->&\u2028\u2029", "b": ["<", ">"]}
    text = script_json(data)
    assert json.loads(text) == data and not set("<>&\u2028\u2029") & set(text)


# --- 7. tracebacks and unclear refusals -----------------------------------------------------------

@pytest.mark.parametrize("name, content, named", [
    ("list.json", "[0.5, 0.4]", "must hold a table of thresholds"),
    ("big.toml", "positional = 1.5", "positional"),
    ("negative.toml", "broad_entropy = -0.1", "broad_entropy"),
    ("distance.toml", "local_distance = 0", "local_distance"),
    ("nan.json", '{"special": NaN}', "special"),
    ("text.toml", 'special = "high"', "special"),
])
def test_bad_rules_files_are_one_line(data, tmp_path, name, content, named):
    rules = tmp_path / name
    rules.write_text(content)
    line = one_line_error(invoke("heads", data["dense"], "--rules", rules))
    assert named in line and str(rules) in line


@pytest.mark.parametrize("sql, named", [("UPDATE EXTENSIONS", "UPDATE EXTENSIONS"), ("ANALYZE", "ANALYZE"),
                                        ("COPY FROM DATABASE memory TO other", "COPY FROM DATABASE")])
def test_query_refusals_name_the_statement(data, sql, named):
    assert f"refused: {named} (" in one_line_error(invoke("query", data["dense"], sql))


# --- 8. smaller things ----------------------------------------------------------------------------

def test_float_columns_share_their_decimals():
    from attnpipe.read.output import float_column

    assert float_column([0.2578, 0.09619, None, 1.0]) == ["0.258", "0.096", "NULL", "1.000"]
    assert float_column([0.2578, 0.09619]) == ["0.2578", "0.0962"]
    assert float_column([12.5, 3.25]) == ["12.50", "3.25"]
    assert float_column([1e-5, 2e-6]) == ["1.000e-05", "2.000e-06"]
    assert float_column([float("nan"), 0.5]) == ["nan", "0.5000"]


def test_query_table_aligns_decimal_points(data):
    result = invoke("query", data["dense"], "SELECT weight FROM edges ORDER BY weight DESC LIMIT 40")
    assert result.exit_code == 0, result.output
    cells = [line for line in result.output.splitlines()[2:] if not line.startswith("(")]
    assert len({len(c) for c in cells}) == 1 and len({c.index(".") for c in cells}) == 1


def test_query_max_width(data):
    sql = "SELECT repeat('abcdefghij', 6) AS t"
    assert "…" in invoke("query", data["dense"], sql).output
    assert "abcdefghij" * 6 in invoke("query", data["dense"], sql, "--max-width", "0").output
    cut = invoke("query", data["dense"], sql, "--max-width", "10").output.splitlines()[2]
    assert cut == "abcdefghi…"


def test_schema_prints_stored_types():
    result = invoke("schema", "edges")
    assert result.exit_code == 0 and "float32*" in result.output
    assert not re.search(r"\bvalue\b\s", result.output.split("* attention values")[0])
    js = json.loads(invoke("schema", "edges", "--json").output)
    assert next(c for c in js["columns"] if c["name"] == "weight")["type"] == "float32"


def test_svg_text_stays_text_and_escaped():
    pytest.importorskip("matplotlib")
    import numpy as np

    from attnpipe.read.matrices import Matrix
    from attnpipe.read.plots import matrix_figure, render

    m = Matrix(np.eye(2), ["<script>", "a&b"], ["</svg>", "x"], "title <b>", "source")
    svg = render(matrix_figure(m), "svg").decode()
    assert "<text" in svg and "&lt;script&gt;" in svg and "a&amp;b" in svg
    assert "<script>" not in svg and "</svg>" not in svg[:-10] and "<b>" not in svg


def test_plotting_an_empty_document_says_it_is_empty(hostile, tmp_path):
    pytest.importorskip("matplotlib")
    line = one_line_error(invoke("plot", hostile, "--doc", "empty-doc", "--layer", "0", "--head", "0",
                                 "-o", tmp_path / "x.png"))
    assert "'empty-doc' is empty" in line
    line = one_line_error(invoke("report", hostile, "--doc", "empty-doc", "-o", tmp_path / "r.html"))
    assert "'empty-doc' is empty" in line
