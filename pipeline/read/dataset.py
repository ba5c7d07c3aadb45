"""`open_dataset(OUT)`: an attnpipe output as a dataset you can read, from its commit records.

Every reader here (pyarrow, pandas, DuckDB) sees only the files the commit records list, so a
run writing to the folder, or files a killed run left, are never read. The records are read once,
when the dataset is opened: the object is a snapshot; open it again to see later commits.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..errors import ReadError
from ..store import paths
from ..store.commit import read_records
from ..store.dataset import check_format, read_info, versions
from .remote import is_url, mirror

log = logging.getLogger("attnpipe")


def open_dataset(path: str | Path) -> "AttnDataset":
    """Open the attnpipe output folder `path` (OUT, or one of its later versions OUT/v2, ...), or
    an output at an fsspec URL (s3://bucket/attn, ...), whose committed files are mirrored into a
    local cache first."""
    return AttnDataset(path)


class AttnDataset:
    """The committed tables of one attnpipe output folder.

    ds.tables                       {table: {"rows", "files", "bytes", "layers"}}
    ds.table("edges")               a pyarrow dataset (`layer` is a column)
    ds.to_pandas("edges", filter={"layer": 5, "head": -1}, columns=[...])
    ds.sql("SELECT ... FROM edges_tokens ...")   DuckDB, read-only, as a pandas DataFrame
    ds.provenance                   model, weights, tokenizer, dtype, versions of the run
    ds.tokens("demo-0001")          the tokens of a document
    """

    def __init__(self, path: str | Path):
        # A URL (s3://, gs://, memory://, ...): its committed files are mirrored into a local
        # cache, checked against their records, and read from there (see remote.py).
        self.source = str(path)
        if is_url(path):
            path = mirror(str(path))
        self.path = Path(str(path).removeprefix("file://"))
        if not self.path.is_dir():
            raise ReadError(f"{self.path} is not a folder; give the output folder of an attnpipe run")
        check_format(self.path)
        self.info = read_info(self.path) or {}
        self.records = read_records(self.path)
        if not self.records:
            what = "nothing is committed there yet" if self.info else "not an attnpipe output folder"
            raise ReadError(f"{self.path} has no commit records ({what}); run a job into it first")
        self._query = None
        if self.later_versions:
            log.info("%s has later versions (%s) of a changed job; this reads %s only: give a version's "
                     "folder to read it", self.path, ", ".join(str(p) for p in self.later_versions), self.path)

    def __repr__(self) -> str:
        tables = ", ".join(f"{t} ({v['rows']:,} rows)" for t, v in self.tables.items())
        return f"AttnDataset({self.source!r}: {tables})"

    # --- what is there ------------------------------------------------------------------------

    @cached_property
    def tables(self) -> dict[str, dict]:
        """Tables with committed files: rows, files, bytes and layers, summed from the records."""
        out: dict[str, dict] = {}
        for _, record in sorted(self.records.items()):
            for f in record["files"]:
                t = out.setdefault(f["table"], {"rows": 0, "files": 0, "bytes": 0, "layers": set()})
                t["rows"] += f["rows"]
                t["files"] += 1
                t["bytes"] += f["bytes"]
                if f.get("layer") is not None:
                    t["layers"].add(f["layer"])
        for t in out.values():
            t["layers"] = sorted(t["layers"])
        return out

    def files(self, table: str) -> list[Path]:
        """The committed files of `table`, from the commit records."""
        self._check_table(table)
        return [self.path / f["path"] for _, r in sorted(self.records.items())
                for f in r["files"] if f["table"] == table]

    @cached_property
    def recipe_labels(self) -> dict[str, str]:
        """{recipe_label: table} of the recipes with committed rows, from one file's metadata
        per (table, recipe) (schema v3 and later; empty for older data)."""
        first: dict[tuple, str] = {}
        for _, record in sorted(self.records.items()):
            for f in record["files"]:
                if f.get("recipe") is not None:
                    first.setdefault((f["table"], f["recipe"]), f["path"])
        labels = {}
        for (table, _), rel in sorted(first.items()):
            meta = pq.read_schema(self.path / rel).metadata or {}
            if b"attnpipe.recipe_label" in meta:
                labels[meta[b"attnpipe.recipe_label"].decode()] = table
        return labels

    @property
    def provenance(self) -> dict:
        """How the data was made (model, weights sha256 or revision, tokenizer, dtypes, attention
        backend, library and recipe versions), from the newest commit record."""
        latest = max(self.records.values(), key=lambda r: r.get("committed_at", ""))
        return dict(latest.get("provenance", {}))

    @property
    def pairs(self) -> bool:
        """Whether the run read source/target pairs (an encoder-decoder with corpus.target_column):
        its tokens have two sides, and decoder rows index target tokens."""
        return bool(self.provenance.get("target_column"))

    @property
    def job(self) -> dict:
        """The job that wrote the data, as recorded in `_dataset.json`."""
        return dict(self.info.get("job") or {})

    @property
    def later_versions(self) -> list[Path]:
        """OUT/v2, v3, ...: data of later, changed runs beside this one (open them by path)."""
        return [paths.version_dir(self.path, v) for v in versions(self.path) if v > 1]

    def _check_table(self, table: str) -> None:
        if table not in self.tables:
            raise ReadError(f"{self.path} has no committed rows of table {table!r}; "
                            f"tables: {', '.join(self.tables)}")

    # --- pyarrow and pandas -------------------------------------------------------------------

    def table(self, name: str) -> pads.Dataset:
        """The committed files of table `name` as one pyarrow dataset."""
        from ..store.verify import parquet_format  # page checksums verified as pages are read

        return pads.dataset([str(f) for f in self.files(name)], format=parquet_format())

    def to_arrow(self, name: str, filter: Any = None, columns: list[str] | None = None) -> pa.Table:
        """Rows of table `name`. `filter`: a pyarrow expression, or {column: value or [values]}."""
        data = self.table(name)
        expr = _expression(filter, data.schema)
        if columns:
            unknown = [c for c in columns if c not in data.schema.names]
            if unknown:
                raise ReadError(f"table {name!r} has no column {unknown[0]!r}; columns: {', '.join(data.schema.names)}")
        return data.to_table(filter=expr, columns=columns)

    def to_pandas(self, name: str, filter: Any = None, columns: list[str] | None = None):
        """Rows of table `name` as a pandas DataFrame; `filter` as in `to_arrow`."""
        return self.to_arrow(name, filter, columns).to_pandas()

    def tokens(self, doc_id: str, window_index: int | None = None):
        """The tokens of one document (of one window, if given), in window, side and position order."""
        flt = {"doc_id": doc_id} if window_index is None else {"doc_id": doc_id, "window_index": window_index}
        df = self.to_pandas("tokens", flt)
        if df.empty:
            where = "" if window_index is None else f" window {window_index}"
            raise ReadError(f"document {doc_id!r}{where} is not in {self.path} (see its documents table)")
        order = ["window_index", "side", "position"] if "side" in df.columns else ["window_index", "position"]
        return df.sort_values(order, ignore_index=True)

    # --- heads, plots and the inline view --------------------------------------------------------

    def heads(self, rules: Any = None):
        """The head atlas (as `attnpipe heads`): one row per (layer, head), means and spreads of
        head_stats and a label; `rules` a rules file path or a dict of thresholds."""
        from .heads import head_atlas, load_rules

        loaded = load_rules(**rules) if isinstance(rules, dict) else load_rules(rules)
        return head_atlas(self, loaded)

    def plot(self, doc_id: str, layer: int, head: int | str = "mean", window_index: int = 0,
             words: bool = False):
        """A heatmap of one document's attention (as `attnpipe plot`): a matplotlib Figure."""
        from . import matrices, plots

        m = matrices.attention_matrix(self, doc_id, layer, matrices.parse_head(head), window_index)
        if words:
            m = matrices.merge_words(m, matrices.window_tokens(self, doc_id, window_index))
        return plots.matrix_figure(m)

    def view(self, docs: list[str] | None = None, count: int = 5, height: int = 620):
        """The interactive head view of `docs` (default: the first `count` documents), which
        renders inline in Jupyter; `.save("view.html")` writes it as a page."""
        from .notebook import HeadView, head_view_page

        return HeadView(head_view_page(self, docs, count), height)

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()

    # --- SQL ----------------------------------------------------------------------------------

    @property
    def query(self):
        """The read-only DuckDB views of this dataset (`attnpipe.read.query.Query`)."""
        if self._query is None:
            from ..store.verify import check_committed
            from .query import Query

            check_committed(self.path, self.records)  # DuckDB does not verify page checksums
            self._query = Query({t: self.files(t) for t in self.tables}, label=str(self.path),
                                recipes=self.recipe_labels, pairs=self.pairs)
        return self._query

    def sql(self, sql: str, output: str = "pandas"):
        """Run one read-only statement over the views (every table, `edges_tokens`,
        `rollout_tokens`). `output`: 'pandas' (DataFrame), 'arrow' (Table) or 'relation' (a lazy
        DuckDB relation, valid while this dataset is open)."""
        rel = self.query.run(sql)
        return rel if output == "relation" else self.query.fetch(rel, output)

    def close(self) -> None:
        if self._query is not None:
            self._query.close()
            self._query = None

    def __enter__(self) -> "AttnDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expression(filter: Any, schema: pa.Schema) -> pc.Expression | None:
    """A pyarrow expression from a dict {column: value or list of values} (or an expression)."""
    if filter is None or isinstance(filter, pc.Expression):
        return filter
    if not isinstance(filter, dict):
        raise ReadError(f"filter must be a pyarrow expression or a dict of column -> value, got {type(filter).__name__}")
    expr = None
    for column, value in filter.items():
        if column not in schema.names:
            raise ReadError(f"filter column {column!r} is not a column; columns: {', '.join(schema.names)}")
        term = (pc.field(column).isin(list(value)) if isinstance(value, (list, tuple, set))
                else pc.field(column) == value)
        expr = term if expr is None else expr & term
    return expr
