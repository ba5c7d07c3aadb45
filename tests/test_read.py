"""The read side's data access: open_dataset (pyarrow, pandas, SQL, provenance, tokens), only
committed rows visible, the read-only DuckDB connection (every refused kind), the token views,
`attnpipe query` and its output formats, and the read package's import boundary."""

from __future__ import annotations

import ast
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from attnpipe.errors import QueryError, ReadError
from attnpipe.read import open_dataset
from attnpipe.store import committed_files, read_records

from conftest import invoke


ROOT = Path(__file__).resolve().parents[1]


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# --- open_dataset -------------------------------------------------------------------------------

def test_tables_rows_and_files_come_from_the_records(data, dense):
    records = read_records(data["dense"])
    rows = {}
    for r in records.values():
        for table, n in r["rows"].items():
            rows[table] = rows.get(table, 0) + n
    assert {t: v["rows"] for t, v in dense.tables.items()} == {t: n for t, n in rows.items() if n}
    assert set(dense.tables) == {"documents", "tokens", "words", "head_stats", "edges", "rollout", "maps"}
    assert dense.tables["edges"]["layers"] == [0, 1]
    assert sorted(dense.files("edges")) == sorted(committed_files(data["dense"], "edges"))
    assert "edges" in repr(dense)


def test_table_is_a_pyarrow_dataset_with_layer(dense):
    edges = dense.table("edges")
    assert isinstance(edges, pads.Dataset)
    assert "layer" in edges.schema.names
    assert edges.count_rows() == dense.tables["edges"]["rows"]
    layer1 = edges.to_table(filter=pads.field("layer") == 1)
    assert set(layer1.column("layer").to_pylist()) == {1}


def test_to_pandas_filters_and_columns(dense):
    df = dense.to_pandas("edges", filter={"layer": 1, "head": [-1, 2]}, columns=["layer", "head", "weight"])
    assert list(df.columns) == ["layer", "head", "weight"]
    assert set(df["layer"]) == {1} and set(df["head"]) == {-1, 2}
    full = dense.to_pandas("edges")
    assert len(df) == ((full["layer"] == 1) & full["head"].isin([-1, 2])).sum()
    same = dense.to_pandas("edges", filter=(pads.field("layer") == 1) & pads.field("head").isin([-1, 2]))
    assert len(same) == len(df)
    with pytest.raises(ReadError, match="no column 'nope'"):
        dense.to_pandas("edges", columns=["nope"])
    with pytest.raises(ReadError, match="filter column 'nope'"):
        dense.to_pandas("edges", filter={"nope": 1})
    with pytest.raises(ReadError, match="no committed rows of table 'unknown'"):
        dense.table("unknown")


def test_provenance_job_and_tokens(dense):
    p = dense.provenance
    assert p["num_layers"] == 2 and p["num_heads"] == 4
    assert "versions" in p and "recipes" in p
    assert dense.job["name"] == "test"
    tokens = dense.tokens("d-anim")
    assert tokens["position"].tolist() == list(range(len(tokens)))
    assert tokens["token"].iloc[0] == "[CLS]"
    two = dense.tokens("d-long")
    assert sorted(set(two["window_index"])) == [0, 1]
    assert set(dense.tokens("d-long", 1)["window_index"]) == {1}
    with pytest.raises(ReadError, match="'nope' is not in"):
        dense.tokens("nope")


def test_open_refuses_what_is_not_a_dataset(tmp_path):
    with pytest.raises(ReadError, match="is not a folder"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(ReadError, match="no commit records"):
        open_dataset(tmp_path)
    assert "no commit records" in one_line_error(invoke("query", tmp_path, "SELECT 1"))


def test_later_versions_are_named_and_readable(data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(data["dense"], out)
    shutil.copytree(data["sparse"], out / "v2")
    ds = open_dataset(out)
    assert ds.later_versions == [out / "v2"]
    assert "maps" in ds.tables  # the folder given, not the newest version
    assert "maps" not in open_dataset(out / "v2").tables


# --- only committed rows ------------------------------------------------------------------------

@pytest.fixture
def with_strays(data, tmp_path):
    """A copy of the dense dataset plus what readers must not see: a stray copy of a committed
    edges file (an uncommitted attempt's name) and a stray file attnpipe did not write."""
    out = tmp_path / "out"
    shutil.copytree(data["dense"], out)
    committed = committed_files(out, "edges")[0]
    stray = committed.with_name("shard-00000-deadbeef-r1-0.parquet")
    shutil.copy(committed, stray)
    shutil.copy(committed, out / "tokens" / "notes.parquet")
    return out, stray


def test_uncommitted_files_are_never_read(with_strays):
    out, stray = with_strays
    glob_rows = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/edges/**/*.parquet')").fetchall()[0][0]
    ds = open_dataset(out)
    committed = ds.tables["edges"]["rows"]
    assert glob_rows > committed  # a glob sees the stray file ...
    assert ds.table("edges").count_rows() == committed  # ... the readers do not
    assert len(ds.to_pandas("edges")) == committed
    assert ds.sql("SELECT count(*) AS n FROM edges")["n"][0] == committed
    assert ds.sql("SELECT count(*) AS n FROM tokens")["n"][0] == ds.tables["tokens"]["rows"]
    with pytest.raises(QueryError, match="refused: reading .*deadbeef"):
        ds.sql(f"SELECT count(*) FROM read_parquet('{stray}')")


# --- SQL ----------------------------------------------------------------------------------------

def test_sql_views_of_every_table(dense):
    shown = set(dense.sql("SHOW TABLES")["name"])
    tables = {"documents", "tokens", "words", "head_stats", "edges", "rollout", "maps", "edges_tokens",
              "rollout_tokens"}  # edges_words / rollout_words only beside word-level recipes (test_words.py)
    assert shown == tables | set(dense.recipe_labels) and set(dense.recipe_labels) - tables  # + one per recipe
    for table, info in dense.tables.items():
        assert dense.sql(f"SELECT count(*) AS n FROM {table}")["n"][0] == info["rows"]
    assert dense.sql("SELECT DISTINCT layer FROM edges ORDER BY layer")["layer"].tolist() == [0, 1]
    arrow = dense.sql("SELECT 1 AS a", output="arrow")
    assert arrow.column("a").to_pylist() == [1]
    relation = dense.sql("SELECT count(*) FROM edges", output="relation")
    assert relation.fetchall()[0][0] == dense.tables["edges"]["rows"]


@pytest.mark.parametrize("view, base", [("edges_tokens", "edges"), ("rollout_tokens", "rollout")])
def test_token_views_equal_a_plain_join(dense, view, base):
    rows = dense.to_pandas(base)
    tokens = dense.to_pandas("tokens")[["doc_id", "window_index", "position", "token"]]
    expected = (rows.merge(tokens.rename(columns={"position": "query_pos", "token": "query_token"}),
                           on=["doc_id", "window_index", "query_pos"])
                    .merge(tokens.rename(columns={"position": "key_pos", "token": "key_token"}),
                           on=["doc_id", "window_index", "key_pos"]))
    got = dense.sql(f"SELECT * FROM {view}")
    keys = [c for c in ["doc_id", "window_index", "layer", "head", "query_pos", "key_pos", "recipe", "recipe_params"]
            if c in got.columns]
    cols = keys + ["query_token", "key_token", "weight"]
    a = got[cols].sort_values(keys, ignore_index=True)
    b = expected[cols].sort_values(keys, ignore_index=True)
    assert len(a) == len(rows)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


READ_ONLY = ["SELECT 1", "WITH a AS (SELECT 1 AS x) SELECT x FROM a", "FROM tokens LIMIT 1", "VALUES (1), (2)",
             "DESCRIBE edges", "SHOW TABLES", "SUMMARIZE head_stats", "EXPLAIN SELECT count(*) FROM edges",
             "EXPLAIN ANALYZE SELECT count(*) FROM edges",
             "SELECT * FROM (PIVOT (SELECT layer, head, weight FROM edges) ON layer USING sum(weight))"]


@pytest.mark.parametrize("sql", READ_ONLY)
def test_read_only_statements_run(dense, sql):
    assert dense.sql(sql) is not None


REFUSED = [
    ("INSERT INTO edges SELECT * FROM edges", "INSERT"),
    ("UPDATE edges SET weight = 0", "UPDATE"),
    ("DELETE FROM edges", "DELETE"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(x) AS x + 1", "CREATE"),
    ("CREATE TABLE p AS PIVOT edges ON layer USING sum(weight)", "CREATE"),
    ("DROP VIEW edges", "DROP"),
    ("ALTER VIEW edges RENAME TO e2", "ALTER"),
    ("COPY (SELECT 1) TO '/tmp/attnpipe-should-not-exist.csv'", "COPY"),
    ("COPY edges FROM '/etc/hostname'", "COPY"),
    ("EXPORT DATABASE '/tmp/attnpipe-export'", "EXPORT"),
    ("ATTACH '/tmp/attnpipe.db' AS other", "ATTACH"),
    ("DETACH other", "DETACH"),
    ("INSTALL httpfs", "refused: INSTALL ("),
    ("LOAD httpfs", "refused: LOAD ("),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "refused: RESET ("),
    ("PRAGMA enable_profiling", "refused: PRAGMA ("),
    ("ANALYZE", "refused: ANALYZE ("),
    ("ANALYZE edges", "refused: ANALYZE ("),
    ("VACUUM", "refused: VACUUM ("),
    ("COPY FROM DATABASE memory TO other", "refused: COPY FROM DATABASE ("),
    ("IMPORT DATABASE '/tmp/attnpipe-import'", "refused: IMPORT ("),
    ("UPDATE EXTENSIONS", "refused: UPDATE EXTENSIONS ("),
    ("update extensions (httpfs)", "refused: UPDATE EXTENSIONS ("),
    ("CHECKPOINT", "refused: CHECKPOINT ("),
    ("-- a comment\nUSE memory", "refused: USE ("),
    ("WITH x AS (SELECT 1) INSERT INTO edges SELECT * FROM edges", "refused: INSERT ("),
    ("CALL duckdb_settings()", "CALL"),
    ("BEGIN TRANSACTION", "refused: BEGIN ("),
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "CREATE"),
    ("SELECT 1; DROP VIEW edges", "one statement at a time"),
    ("SELECT * FROM read_csv('/etc/passwd')", "reading /etc/passwd"),
    ("SELECT * FROM read_text('/etc/hostname')", "reading /etc/hostname"),
    ("SELECT * FROM glob('/etc/*')", "reading /etc/*"),
    ("SELECT * FROM read_parquet('{out}/edges/**/*.parquet')", "reading {out}/edges"),
    ("SELECT * FROM query('CREATE TABLE t AS SELECT 1')", "SQL error"),
]


@pytest.mark.parametrize("sql, named", REFUSED, ids=[r[0][:40] for r in REFUSED])
def test_refused_statements_name_what_is_refused(dense, data, sql, named):
    out = str(data["dense"])
    sql, named = sql.format(out=out), named.format(out=out)
    with pytest.raises(QueryError) as caught:
        dense.sql(sql)
    message = str(caught.value)
    assert named in message and "\n" not in message
    assert not Path("/tmp/attnpipe-should-not-exist.csv").exists()
    assert not Path("/tmp/attnpipe-export").exists() and not Path("/tmp/attnpipe.db").exists()
    # the views are intact afterwards
    assert dense.sql("SELECT count(*) AS n FROM edges")["n"][0] == dense.tables["edges"]["rows"]


def test_duckdb_itself_refuses_files_and_settings(dense):
    """The second lock: even a statement that got past the parser check could not open files."""
    con = dense.query.con
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", "COPY (SELECT 1) TO '/tmp/attnpipe-x.csv'",
                "ATTACH '/tmp/attnpipe-x.db'"):
        with pytest.raises(duckdb.PermissionException):
            con.execute(sql)
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")


def test_query_cli_errors_are_one_line(data):
    line = one_line_error(invoke("query", data["dense"], "COPY (SELECT 1) TO '/tmp/x.csv'"))
    assert "refused: COPY" in line
    line = one_line_error(invoke("query", data["dense"], "SELECT * FROM maps_typo"))
    assert "maps_typo" in line and "edges_tokens" in line


def test_missing_table_names_the_views(data):
    ds = open_dataset(data["sparse"])
    with pytest.raises(QueryError, match="views of .*: documents, edges, rollout, tokens, words, edges_tokens, rollout_tokens"):
        ds.sql("SELECT * FROM maps")


# --- attnpipe query output ----------------------------------------------------------------------

SQL = "SELECT doc_id, layer, head, query_pos, key_pos, weight FROM edges ORDER BY ALL LIMIT 20"


def test_query_table_format(data, dense):
    result = invoke("query", data["dense"], SQL)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["doc_id", "layer", "head", "query_pos", "key_pos", "weight"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[-1] == "(20 rows)"
    assert len(lines) == 23
    cut = invoke("query", data["dense"], "SELECT * FROM edges", "--max-rows", 5)
    assert cut.exit_code == 0
    assert f"(5 of {dense.tables['edges']['rows']:,} rows shown" in cut.output


def test_query_csv_json_parquet(data, dense, tmp_path):
    expected = dense.sql(SQL)
    csv = invoke("query", data["dense"], SQL, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(csv.output)), expected, check_dtype=False, atol=1e-6)
    js = invoke("query", data["dense"], SQL, "--format", "json")
    pd.testing.assert_frame_equal(pd.DataFrame(json.loads(js.output)), expected, check_dtype=False, atol=1e-6)
    target = tmp_path / "result.parquet"
    pq_run = invoke("query", data["dense"], SQL, "--format", "parquet", "-o", target)
    assert pq_run.exit_code == 0, pq_run.output
    pd.testing.assert_frame_equal(pq.read_table(target).to_pandas(), expected)
    out_csv = tmp_path / "result.csv"
    assert invoke("query", data["dense"], SQL, "--format", "csv", "--out", out_csv).exit_code == 0
    assert len(pd.read_csv(out_csv)) == 20
    assert "-o/--out" in one_line_error(invoke("query", data["dense"], SQL, "--format", "parquet"))
    assert "does not exist" in one_line_error(invoke("query", data["dense"], SQL, "-o", tmp_path / "no" / "x.csv"))


def test_query_list_columns_as_csv_and_json(data):
    csv = invoke("query", data["dense"], "SELECT query_pos, weights FROM maps ORDER BY ALL LIMIT 3", "--format", "csv")
    df = pd.read_csv(io.StringIO(csv.output))
    assert all(isinstance(json.loads(w), list) for w in df["weights"])
    js = json.loads(invoke("query", data["dense"], "SELECT weights FROM maps LIMIT 2", "--format", "json").output)
    assert isinstance(js[0]["weights"], list)
    empty = invoke("query", data["dense"], "SELECT * FROM edges WHERE false", "--format", "json")
    assert json.loads(empty.output) == []


# --- import boundary ----------------------------------------------------------------------------

FORBIDDEN = ("torch", "transformers", "attnpipe.capture", "attnpipe.model", "attnpipe.executor",
             "attnpipe.shard", "attnpipe.reduce", "attnpipe.recipes", "attnpipe.runtime")


def test_read_package_never_imports_model_code():
    for path in sorted((ROOT / "pipeline" / "read").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = ["attnpipe", "read"][:2 - node.level + 1] if node.level else []
                base = ".".join(package + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"


def test_open_dataset_without_torch(data):
    code = (f"import sys; from attnpipe import open_dataset; ds = open_dataset({str(data['dense'])!r}); "
            "ds.sql('SELECT count(*) FROM edges_tokens'); ds.to_pandas('head_stats'); "
            "from attnpipe.read import heads, matrices, report; heads.head_atlas(ds); "
            "matrices.attention_matrix(ds, 'd-anim', 1, -1); "
            f"bad = [m for m in sys.modules if m.startswith({FORBIDDEN!r})]; print(bad); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout


def test_a_dataset_never_closed_leaves_no_temp_folder(data, tmp_path):
    """DuckDB's private spill folder goes when the dataset is closed, collected, or the process
    exits without closing it (a notebook's dataset; these folders piled up in /tmp before)."""
    import os

    script = ("import glob, sys\nfrom attnpipe.read import open_dataset\nds = open_dataset(sys.argv[1])\n"
              "ds.sql('SELECT count(*) FROM head_stats')\nprint(len(glob.glob(sys.argv[2] + '/attnpipe-duckdb-*')))\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script, str(data["dense"]), str(tmp_path)], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "1"  # made while open
    assert not list(tmp_path.glob("attnpipe-duckdb-*"))  # gone at exit
