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
from pathlib import Path

import duckdb
import pyarrow as pa

from ..errors import QueryError

# Joins users would otherwise write every time: edge and rollout rows with the strings of their
# query and key tokens (the same positions: tokens.position = query_pos / key_pos).
TOKEN_VIEWS = {
    "edges_tokens": ("edges", "e.head, "),
    "rollout_tokens": ("rollout", ""),
}
_TOKEN_VIEW_SQL = """
CREATE VIEW {name} AS
SELECT e.doc_id, e.window_index, e.layer, {head}e.query_pos, q.token AS query_token,
       e.key_pos, k.token AS key_token, e.weight, e.recipe, e.recipe_params
FROM {base} e
JOIN tokens q ON q.doc_id = e.doc_id AND q.window_index = e.window_index AND q.position = e.query_pos
JOIN tokens k ON k.doc_id = e.doc_id AND k.window_index = e.window_index AND k.position = e.key_pos
"""

# DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first all parse as SELECT; EXPLAIN is checked on the
# statement it explains (EXPLAIN ANALYZE runs it).
_READ_ONLY = {"SELECT"}
_REFUSED = {
    "INSERT": "INSERT writes rows", "UPDATE": "UPDATE writes rows", "DELETE": "DELETE writes rows",
    "CREATE": "CREATE makes tables, views or secrets", "DROP": "DROP removes tables or views",
    "ALTER": "ALTER changes tables", "COPY": "COPY reads or writes files outside the dataset's views",
    "EXPORT": "EXPORT DATABASE writes files", "ATTACH": "ATTACH opens another database",
    "DETACH": "DETACH changes the attached databases", "LOAD": "INSTALL/LOAD of extensions",
    "SET": "SET/RESET/USE changes settings", "PRAGMA": "PRAGMA changes settings (use DESCRIBE or SHOW)",
    "TRANSACTION": "transactions", "VACUUM": "VACUUM", "ANALYZE": "ANALYZE",
    "PREPARE": "PREPARE", "EXECUTE": "EXECUTE", "VARIABLE_SET": "SET VARIABLE changes settings",
    "CALL": "CALL (write SELECT * FROM function(...))",
    "COPY_DATABASE": "COPY FROM DATABASE writes files", "CREATE_FUNC": "CREATE FUNCTION/MACRO",
}
ALLOWED = "SELECT, WITH, VALUES, FROM, DESCRIBE, SHOW, SUMMARIZE and EXPLAIN"
_QUERY_START = re.compile(r"^[\s(]*(SELECT|WITH|FROM|PIVOT|UNPIVOT)\b", re.IGNORECASE)
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\(.*?\)\s*)?(?:ANALY[SZ]E\s+)?", re.IGNORECASE | re.DOTALL)


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def _kind(statement) -> str:
    return getattr(statement.type, "name", str(statement.type)).upper()


def check_read_only(sql: str) -> str:
    """The one statement of `sql`, if it only reads; otherwise a QueryError naming what is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except ValueError:  # a statement kind this DuckDB has no name for in Python (UPDATE EXTENSIONS, ...)
        raise QueryError(f"refused: {sql.strip().split()[0].upper()} is not read-only; "
                         f"attnpipe query runs only {ALLOWED}") from None
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
        if kind == "MULTI":  # several parts (CREATE TABLE ... AS PIVOT ...): name it by its first word
            kind = (statement.query.split() or ["MULTI"])[0].upper()
        what = _REFUSED.get(kind, f"{kind} statements")
        raise QueryError(f"refused: {what}; attnpipe query is read-only and runs only {ALLOWED}")
    return sql


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Query:
    """A DuckDB connection with one view per table of a dataset (and the token views), which can
    open only the dataset's committed files. `run(sql)` checks the statement, then runs it."""

    def __init__(self, files: dict[str, list[Path]], label: str = "the dataset"):
        self.label = label
        self.tables = sorted(t for t, fs in files.items() if fs)
        allowed = sorted(str(Path(f).resolve()) for fs in files.values() for f in fs)
        # Extension autoloading off before anything can trigger it; parquet and json are built in.
        self.con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False,
                                          "allow_community_extensions": False})
        self.con.execute(f"SET allowed_paths = {_sql_list(allowed)}")
        self.con.execute("SET allowed_directories = []")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        for table in self.tables:
            paths = [str(Path(f).resolve()) for f in files[table]]
            self.con.execute(f'CREATE VIEW "{table}" AS SELECT * FROM read_parquet({_sql_list(paths)})')
        for name, (base, head) in TOKEN_VIEWS.items():
            if base in self.tables and "tokens" in self.tables:
                self.con.execute(_TOKEN_VIEW_SQL.format(name=name, base=base, head=head))
        self.views = self.tables + [n for n, (b, _) in TOKEN_VIEWS.items() if b in self.tables and "tokens" in self.tables]

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
        if isinstance(exc, duckdb.CatalogException):
            missing = re.search(r"with name (\S+) does not exist", line)
            if missing:
                return QueryError(f"{line} (the views of {self.label}: {', '.join(self.views) or 'none'})")
        return QueryError(f"SQL error: {line}")

    def close(self) -> None:
        self.con.close()


def reader_of(table: pa.Table | pa.RecordBatchReader) -> pa.RecordBatchReader:
    if isinstance(table, pa.Table):
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
    return table
