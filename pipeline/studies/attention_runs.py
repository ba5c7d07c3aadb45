"""A finished run's attention rows as full (layer, head, query_pos, key_pos) arrays per window,
for studies that compare or export whole rows (distill).

- From `maps` (the dense recipe): every weight, exact.
- From `edges` (topk, threshold or topp): the stored keys keep their weights and the rest of the
  row's mass (1 - the stored sum) is spread evenly over the row's other keys (every key of the
  window; for causal models keys 0..query_pos). The same reconstruction the sparse export's
  truncation error is measured against.

Only token-level, self-attention rows are read (word-level recipes index words, which two
tokenizers do not share).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import ReadError
from ..read import open_dataset
from .align import Side

Key = tuple[str, int]  # (doc_id, window_index)


@dataclass(frozen=True)
class Source:
    """The recipe rows a run's attention is read from: table, recipe_label and its parameters."""

    table: str  # maps (exact) or edges (approximate)
    label: str
    params: dict

    @property
    def per_head(self) -> bool:
        return bool(self.params.get("per_head", True))


@dataclass
class Run:
    """One attnpipe output folder, read for a study: its documents, tokens and attention sources."""

    path: str
    provenance: dict
    documents: pd.DataFrame  # doc_id, text_sha1 of non-empty documents
    tokens: dict[Key, Side]
    maps: Source | None
    edges: Source | None
    ds: object = field(repr=False)

    @property
    def layers(self) -> int:
        return int(self.provenance.get("num_layers") or 0)

    @property
    def causal(self) -> bool:
        return bool(self.provenance.get("causal"))

    def heads(self, source: Source) -> int:
        """Heads in the arrays: every head, or 1 (the head mean) for a recipe run with per_head false."""
        return int(self.provenance.get("num_heads") or 0) if source.per_head else 1

    def windows(self, source: Source) -> list[Key]:
        """The windows with rows of `source`: dense maps exist only for windows up to max_tokens."""
        if source.table == "edges":
            return sorted(self.tokens)
        t = self.ds.to_arrow("maps", _rows_of(source) & (pc.field("layer") == 0) & (pc.field("query_pos") == 0),
                             columns=["doc_id", "window_index"])
        found = {(str(d), int(w)) for d, w in zip(t["doc_id"].to_pylist(), t["window_index"].to_pylist())}
        return sorted(found & set(self.tokens))

    def arrays(self, source: Source, keys: list[Key]) -> dict[Key, np.ndarray]:
        """{window: (layer, head, query_pos, key_pos) float64} of `keys`, from `source`."""
        flt = _rows_of(source) & pc.field("doc_id").isin(sorted({d for d, _ in keys}))
        value = "weights" if source.table == "maps" else "weight"
        cols = ["doc_id", "window_index", "layer", "head", "query_pos", value] + (
            ["key_pos"] if source.table == "edges" else [])
        table = self.ds.to_arrow(source.table, flt, columns=cols)
        heads = self.heads(source)
        out = {k: np.zeros((self.layers, heads, len(self.tokens[k]), len(self.tokens[k]))) for k in keys}
        _scatter(table, out, source, heads)
        if source.table == "edges":
            for k, a in out.items():
                spread_leftover(a, self.causal)
        return out


def _rows_of(source: Source) -> pc.Expression:
    head = pc.field("head") >= 0 if source.per_head else pc.field("head") == -1
    return (pc.field("recipe_label") == source.label) & (pc.field("attention") == "self") & head


def _scatter(table: pa.Table, out: dict[Key, np.ndarray], source: Source, heads: int) -> None:
    """Write the rows of `table` into the window arrays of `out` (others are skipped)."""
    if not table.num_rows:
        return
    doc = table["doc_id"].to_numpy(zero_copy_only=False).astype(str)
    win = table["window_index"].to_numpy()
    layer, head, q = (table[c].to_numpy().astype(np.int64) for c in ("layer", "head", "query_pos"))
    head = head if source.per_head else np.zeros_like(head)
    if source.table == "maps":
        lengths = pc.list_value_length(table["weights"]).to_numpy().astype(np.int64)
        values = pc.list_flatten(table["weights"]).to_numpy().astype(np.float64)
        row = np.repeat(np.arange(table.num_rows), lengths)
        key = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    else:
        values = table["weight"].to_numpy().astype(np.float64)
        row, key = np.arange(table.num_rows), table["key_pos"].to_numpy().astype(np.int64)
    code, names = pd.factorize(pd.Series(doc) + "\x1f" + pd.Series(win).astype(str))
    element = code[row]  # the window of each stored weight
    order = np.argsort(element, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(element, minlength=len(names)))])
    for c, name in enumerate(names):
        d, _, w = name.rpartition("\x1f")
        a = out.get((d, int(w)))
        if a is None:
            continue
        at = order[bounds[c]:bounds[c + 1]]
        r = row[at]
        a[layer[r], head[r], q[r], key[at]] = values[at]


def spread_leftover(a: np.ndarray, causal: bool) -> None:
    """In place, on (..., query_pos, key_pos) rows holding only some keys: spread each row's
    missing mass (1 - its sum) evenly over its keys that hold 0 (for causal models only keys up
    to the query's own position are keys)."""
    n = a.shape[-1]
    valid = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    empty = (a == 0) & valid
    missing = np.clip(1.0 - a.sum(-1), 0.0, None)
    count = empty.sum(-1)
    fill = np.where(count > 0, missing / np.maximum(count, 1), 0.0)
    a += empty * fill[..., None]


def choose_source(ds, table: str) -> Source | None:
    """The recipe of `table` to read: token-level rows, every head before the head mean; for
    edges the largest top-k (then threshold, top-p). None when the run has no such rows."""
    if table not in ds.tables:
        return None
    params = _recipe_params(ds, table)
    usable = {label: p for label, p in params.items() if p.get("level", "token") == "token"}
    if not usable:
        return None

    def rank(item):
        label, p = item
        recipe = p.get("_recipe", "")
        return (not p.get("per_head", True), {"dense": 0, "topk": 0, "threshold": 1, "topp": 2}.get(recipe, 3),
                -p.get("k", p.get("max_tokens", 0)), label)

    label, p = min(usable.items(), key=rank)
    return Source(table, label, {k: v for k, v in p.items() if k != "_recipe"})


def _recipe_params(ds, table: str) -> dict[str, dict]:
    """{recipe_label: parameters (and `_recipe`, its name)} from one committed file per label."""
    out: dict[str, dict] = {}
    for _, record in sorted(ds.records.items()):
        for f in record["files"]:
            if f["table"] != table:
                continue
            meta = pq.read_schema(Path(ds.path) / f["path"]).metadata or {}
            label = meta.get(b"attnpipe.recipe_label", b"").decode()
            if label and label not in out:
                out[label] = {**json.loads(meta.get(b"attnpipe.recipe_params", b"{}")),
                              "_recipe": meta.get(b"attnpipe.recipe", b"").decode()}
    return out


def open_run(path: str | Path, role: str) -> Run:
    """Read a run's documents and tokens and pick its attention sources; `role` names it in
    messages (--teacher, --student, OUTPUT)."""
    if not Path(str(path)).exists() and "://" not in str(path):
        raise ReadError(f"{role} {path}: no such folder; give the output folder of an attnpipe run")
    ds = open_dataset(path)
    if ds.pairs:
        raise ReadError(f"{role} {path} read source/target pairs; distillation compares one stack's "
                        "self-attention (runs of encoder or decoder models)")
    docs = ds.to_pandas("documents", columns=["doc_id", "text_sha1", "empty"])
    docs = docs[~docs["empty"]].drop(columns="empty").sort_values("doc_id", ignore_index=True)
    return Run(str(path), ds.provenance, docs, window_sides(ds), choose_source(ds, "maps"),
               choose_source(ds, "edges"), ds)


def window_sides(ds) -> dict[Key, Side]:
    """Every window's source-side tokens (offsets and special flags) in position order."""
    t = ds.to_pandas("tokens", columns=["doc_id", "window_index", "side", "position", "char_start",
                                        "char_end", "special"])
    t = t[t["side"] == "source"].sort_values(["doc_id", "window_index", "position"])
    return {(str(d), int(w)): Side.of(g["char_start"], g["char_end"], g["special"])
            for (d, w), g in t.groupby(["doc_id", "window_index"], sort=False, observed=True)}
