"""SQL over a dataset: DuckDB views of every table, built from the committed files only, on a
connection that can read nothing else and change nothing.

Two locks, so that one failing does not open the other:
- every statement is parsed first and only read-only kinds run (SELECT / WITH / VALUES / FROM,
  DESCRIBE, SHOW, SUMMARIZE, and EXPLAIN of those);
- DuckDB itself may open only the committed files (`allowed_paths`), with external access,
  extension installs and loads off and the configuration locked, so `read_csv('/etc/passwd')`,
  `COPY ... TO`, `ATTACH`, `INSTALL` and a glob of the folder (which would see uncommitted files)
  fail inside DuckDB too.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from pathlib import Path

import duckdb
import pyarrow as pa

from ..errors import QueryError

# Joins users would otherwise write every time: edge and rollout rows with the strings of their
# query and key tokens (the same positions: tokens.position = query_pos / key_pos, on the side
# each position indexes: in encoder-decoder pair runs a decoder row's queries are target tokens,
# and so are its keys for self-attention, while cross-attention keys are source tokens). Rows of
# word-level recipes (level = "word") index words, so they join `words` instead (edges_words,
# rollout_words: query_word / key_word, the words' text) and are left out of the token views.
TOKEN_VIEWS = {
    "edges_tokens": ("edges", "e.head, ", "tokens"),
    "rollout_tokens": ("rollout", "", "tokens"),
    "edges_words": ("edges", "e.head, ", "words"),
    "rollout_words": ("rollout", "", "words"),
}
_UNITS = {"tokens": ("token", "token", "position", "NOT LIKE"), "words": ("word", "text", "word_index", "LIKE")}
_TOKEN_VIEW_SQL = """
CREATE VIEW {name} AS
SELECT e.doc_id, e.window_index, e.layer, {site}{head}e.query_pos, q.{text} AS query_{unit},
       e.key_pos, k.{text} AS key_{unit}, e.weight, e.recipe, e.recipe_params{label}
FROM {base} e
JOIN {table} q ON q.doc_id = e.doc_id AND q.window_index = e.window_index AND q.{pos} = e.query_pos{q_side}
JOIN {table} k ON k.doc_id = e.doc_id AND k.window_index = e.window_index AND k.{pos} = e.key_pos{k_side}
WHERE e.recipe_params {level} '%"level":"word"%'
"""
_QUERY_SIDE = " AND q.side = CASE WHEN e.stack = 'decoder' THEN 'target' ELSE 'source' END"
_KEY_SIDE = " AND k.side = CASE WHEN e.stack = 'decoder' AND e.attention = 'self' THEN 'target' ELSE 'source' END"

# DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first all parse as SELECT; EXPLAIN is checked on the
# statement it explains (EXPLAIN ANALYZE runs it).
_READ_ONLY = {"SELECT"}
# Why each statement is refused, by the words it starts with. DuckDB's statement kinds do not name
# them (ANALYZE parses as VACUUM, COPY FROM DATABASE and IMPORT DATABASE as PRAGMA, CHECKPOINT as
# CALL, UPDATE EXTENSIONS has no kind in Python), so the refusal names what the user wrote.
_WHY = {
    "INSERT": "writes rows", "UPDATE": "writes rows", "DELETE": "writes rows", "MERGE": "writes rows",
    "TRUNCATE": "removes rows", "CREATE": "makes tables, views, functions or secrets",
    "DROP": "removes tables, views or secrets", "ALTER": "changes tables", "COMMENT": "changes the catalog",
    "COPY": "reads or writes files outside the dataset's views",
    "COPY FROM DATABASE": "copies a database", "EXPORT": "writes files", "IMPORT": "reads files into tables",
    "ATTACH": "opens another database", "DETACH": "changes the attached databases",
    "INSTALL": "installs extensions", "LOAD": "loads extensions", "FORCE": "installs or writes",
    "UPDATE EXTENSIONS": "updates installed extensions",
    "SET": "changes settings", "RESET": "changes settings", "USE": "changes the default database",
    "PRAGMA": "changes settings (use DESCRIBE or SHOW)", "VACUUM": "rewrites the database",
    "ANALYZE": "gathers statistics into the database", "CHECKPOINT": "writes the database",
    "BEGIN": "starts a transaction", "START": "starts a transaction", "COMMIT": "ends a transaction",
    "END": "ends a transaction", "ROLLBACK": "ends a transaction", "ABORT": "ends a transaction",
    "TRANSACTION": "controls transactions", "PREPARE": "prepares statements", "EXECUTE": "runs prepared statements",
    "DEALLOCATE": "removes prepared statements", "CALL": "runs a procedure (write SELECT * FROM function(...))",
    "MULTI": "several statements",
}
ALLOWED = "SELECT, WITH, VALUES, FROM, DESCRIBE, SHOW, SUMMARIZE and EXPLAIN"
_QUERY_START = re.compile(r"^[\s(]*(SELECT|WITH|FROM|PIVOT|UNPIVOT)\b", re.IGNORECASE)
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\(.*?\)\s*)?(?:ANALY[SZ]E\s+)?", re.IGNORECASE | re.DOTALL)
_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _kind(statement) -> str:
    try:
        return getattr(statement.type, "name", str(statement.type)).upper()
    except ValueError:  # a kind this DuckDB has no name for in Python (UPDATE EXTENSIONS, ...)
        return "UNKNOWN"


def statement_name(sql: str, kind: str | None = None) -> str:
    """The refused statement as the user wrote it: its first words (COPY FROM DATABASE, ANALYZE,
    UPDATE EXTENSIONS), or DuckDB's kind when it starts with a word we do not refuse (WITH ... INSERT)."""
    words = re.findall(r"[A-Za-z_]+", _COMMENTS.sub("", sql, count=1))[:3]
    words = [w.upper() for w in words]
    for n in (3, 2, 1):
        name = " ".join(words[:n])
        if len(words) >= n and name in _WHY:
            return name
    return kind or (words[0] if words else "this statement")


def _refusal(sql: str, kind: str | None = None) -> QueryError:
    name = statement_name(sql, kind)
    why = _WHY.get(name, _WHY.get(name.split()[0], "is not read-only"))
    return QueryError(f"refused: {name} ({why}); attnpipe query is read-only and runs only {ALLOWED}")


def check_read_only(sql: str) -> str:
    """The one statement of `sql`, if it only reads; otherwise a QueryError naming what is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except ValueError:  # as in _kind, in DuckDB versions that name the kind while extracting
        raise _refusal(sql) from None
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {_first_line(exc)}") from None
    if not statements:
        raise QueryError("no SQL statement given")
    if len(statements) > 1:
        raise QueryError(f"one statement at a time, got {len(statements)}")
    statement = statements[0]
    kind = _kind(statement)
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: check that one too
        inner = _EXPLAIN.sub("", statement.query, count=1)
        check_read_only(inner)
        return sql
    if kind == "MULTI" and _QUERY_START.match(statement.query):
        return sql  # PIVOT without an IN list: DuckDB first collects the pivot values, then selects
    if kind not in _READ_ONLY:
        raise _refusal(statement.query, None if kind == "UNKNOWN" else kind)
    return sql


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Query:
    """A DuckDB connection with one view per table of a dataset (and the token views), which can
    open only the dataset's committed files. `run(sql)` checks the statement, then runs it."""

    def __init__(self, files: dict[str, list[Path]], label: str = "the dataset",
                 recipes: dict[str, str] | None = None, pairs: bool = False):
        self.label = label
        self.pairs = pairs  # source/target pairs (corpus.target_column): tokens on two sides
        self.tables = sorted(t for t, fs in files.items() if fs)
        allowed = sorted(str(Path(f).resolve()) for fs in files.values() for f in fs)
        # DuckDB adds its temp folder to the allowed paths, and the default is ./.tmp of the
        # current folder: a user's own files (or a .tmp symlink to /etc) would become readable.
        # A fresh private folder of our own (0700, random name, removed on close) holds only
        # DuckDB's spill files, so large sorts still spill to disk.
        self._temp = tempfile.mkdtemp(prefix="attnpipe-duckdb-")
        # Removed on close, and also when the object is collected or the interpreter exits: a
        # dataset opened in a notebook and never closed left its folder in /tmp for good.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._temp, ignore_errors=True)
        # Extension autoloading off before anything can trigger it; parquet and json are built in.
        self.con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False,
                                          "allow_community_extensions": False,
                                          "temp_directory": self._temp})
        self.con.execute(f"SET allowed_paths = {_sql_list(allowed)}")
        self.con.execute("SET allowed_directories = []")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        try:
            self._views(files, recipes or {})
        except duckdb.Error as exc:  # a committed file that is not readable Parquet any more
            self.close()
            raise damaged(label, _first_line(exc)) from None

    def _views(self, files: dict[str, list[Path]], recipes: dict[str, str]) -> None:
        """A view per table, the token joins, and one view per recipe label (`topk_k8_mean`:
        that recipe's rows of its table) where the label names nothing else."""
        for table in self.tables:
            paths = [str(Path(f).resolve()) for f in files[table]]
            self.con.execute(f'CREATE VIEW "{table}" AS SELECT * FROM read_parquet({_sql_list(paths)})')
        self.views = list(self.tables)
        word_level = {t for label, t in recipes.items() if label.endswith("_word")}  # tables with word rows
        for name, (base, head, table) in TOKEN_VIEWS.items():
            if base in self.tables and table in self.tables and (table == "tokens" or base in word_level):
                columns = [d[0] for d in self.con.execute(f'SELECT * FROM "{base}" LIMIT 0').description]
                label = ", e.recipe_label" if "recipe_label" in columns else ""  # schema v3 and later
                site = "e.stack, e.attention, " if "stack" in columns else ""  # not in v2 data
                sides = self.pairs and "stack" in columns
                unit, text, pos, level = _UNITS[table]
                self.con.execute(_TOKEN_VIEW_SQL.format(name=name, base=base, head=head, label=label, site=site,
                                                        table=table, unit=unit, text=text, pos=pos, level=level,
                                                        q_side=_QUERY_SIDE if sides else "",
                                                        k_side=_KEY_SIDE if sides else ""))
                self.views.append(name)
        for label, table in sorted(recipes.items()):
            if table in self.tables and label not in self.views and label.isidentifier():
                self.con.execute(f'CREATE VIEW "{label}" AS SELECT * FROM "{table}" WHERE recipe_label = \'{label}\'')
                self.views.append(label)

    def run(self, sql: str) -> duckdb.DuckDBPyRelation:
        """The relation of a read-only statement (lazy: nothing is read until it is fetched)."""
        check_read_only(sql)
        try:
            rel = self.con.sql(sql)
        except duckdb.Error as exc:
            raise self._explain(exc) from None
        if rel is None:  # a statement with no result; check_read_only makes this unreachable
            raise QueryError("the statement returned no rows")
        return rel

    def fetch(self, rel: duckdb.DuckDBPyRelation, how: str):
        """Fetch a relation as 'pandas', 'arrow' (a Table) or 'reader' (a RecordBatchReader)."""
        try:
            if how == "pandas":
                return rel.df()
            if how == "arrow":
                return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
            if how == "reader":
                if hasattr(rel, "to_arrow_reader"):
                    return rel.to_arrow_reader()
                return rel.fetch_record_batch()
        except duckdb.Error as exc:
            raise self._explain(exc) from None
        raise ValueError(f"unknown result kind {how!r}")

    def _explain(self, exc: duckdb.Error) -> QueryError:
        """DuckDB's error as one line, saying why when it is one of our refusals."""
        line = _first_line(exc)
        if isinstance(exc, duckdb.PermissionException):
            target = re.search(r'"([^"]+)"', line)
            what = f"reading {target.group(1)}" if target else "file access"
            return QueryError(f"refused: {what}: queries read only the committed files of {self.label}, "
                              f"through the views {', '.join(self.views)}")
        if isinstance(exc, (duckdb.IOException, duckdb.InvalidInputException)) and self._about_files(line):
            return damaged(self.label, line)
        if isinstance(exc, duckdb.CatalogException):
            missing = re.search(r"with name (\S+) does not exist", line)
            if missing:
                return QueryError(f"{line} (the views of {self.label}: {', '.join(self.views) or 'none'})")
        return QueryError(f"SQL error: {line}")

    def _about_files(self, line: str) -> bool:
        """Whether DuckDB's error is about reading one of the committed files."""
        return "parquet" in line.lower() or any(t in line for t in ("No files found", "No such file"))

    def close(self) -> None:
        self.con.close()
        self._cleanup()


def damaged(label: str, detail: str) -> QueryError:
    return QueryError(f"the data of {label} is damaged ({detail}); 'attnpipe verify {label}' tells more")


def reader_of(table: pa.Table | pa.RecordBatchReader) -> pa.RecordBatchReader:
    if isinstance(table, pa.Table):
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
    return table
