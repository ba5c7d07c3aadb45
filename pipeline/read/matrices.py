"""Attention of one document as matrices, for plots and the report.

- `attention_matrix`: one window x layer x head as a (query_pos, key_pos) matrix, from `maps`
  when the dense recipe stored it, else from `edges` as a sparse view (NaN = not stored: below
  the recipe's top-k, threshold or top-p cut).
- `rollout_matrix`: what one query token attends to after rollout, layer by layer.
- `crop` and `merge_words`: keep long documents readable. Words are the tokens' `word_index`
  (pipeline/wordpieces.py; older data: the same rule on character offsets, pieces whose offsets
  touch form one word, punctuation at a word's edge on its own); merged weights are the sum over
  the attended word's pieces and the mean over the attending word's pieces, so each row still
  sums to what its tokens' rows summed to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ReadError
from ..wordpieces import clean_token, offset_words  # clean_token: also used by report.py


@dataclass(frozen=True)
class Matrix:
    """Weights (rows x cols) with labels. NaN marks cells that were not stored."""

    weights: np.ndarray
    row_labels: list[str]
    col_labels: list[str]
    title: str
    source: str
    row_name: str = "query token"
    col_name: str = "key token"

    @property
    def sparse(self) -> bool:
        return bool(np.isnan(self.weights).any())


def word_groups(tokens) -> list[list[int]]:
    """Positions grouped into words (a tokens DataFrame of one window, in position order): by its
    `word_index` column where the data has one (schema v3: the words of word-level recipes and
    of the `words` table), else by the same rule from character offsets (pipeline/wordpieces.py).
    Special tokens are words of their own; so is punctuation at a word's start or end, while
    punctuation inside a word (don't, well-known, 3.5) stays in it."""
    if "word_index" in tokens and not tokens["word_index"].isna().any():
        words = tokens["word_index"].astype(int).tolist()
    else:
        words = offset_words(tokens["token"].tolist(), tokens["char_start"].tolist(),
                             tokens["char_end"].tolist(), tokens["special"].tolist())
    groups: list[list[int]] = []
    for pos, w in enumerate(words):
        if groups and w == words[groups[-1][0]]:
            groups[-1].append(pos)
        else:
            groups.append([pos])
    return groups


def word_labels(tokens, groups: list[list[int]]) -> list[str]:
    toks = tokens["token"].tolist()
    return ["".join(clean_token(toks[i]) for i in g) for g in groups]


def merge_words(m: Matrix, tokens, rows: bool = True, cols: bool = True) -> Matrix:
    """Merge token positions into words: sum over the attended (column) word's pieces, mean over
    the attending (row) word's pieces. Not-stored cells count as 0 unless a whole word's cells
    are not stored."""
    groups = word_groups(tokens)
    labels = word_labels(tokens, groups)
    w = m.weights
    known = ~np.isnan(w)
    filled = np.where(known, w, 0.0)
    if cols:
        S = np.zeros((w.shape[1], len(groups)))  # (key_pos, word): sums a word's pieces
        for j, g in enumerate(groups):
            S[[p for p in g if p < w.shape[1]], j] = 1.0
        filled, known = filled @ S, (known.astype(float) @ S) > 0
    if rows:
        M = np.zeros((len(groups), filled.shape[0]))  # (word, query_pos): averages a word's pieces
        for j, g in enumerate(groups):
            M[j, g] = 1.0 / len(g)
        filled, known = M @ filled, (M @ known.astype(float)) > 0
    merged = np.where(known, filled, np.nan)
    return replace(m, weights=merged, row_labels=labels if rows else m.row_labels,
                   col_labels=labels if cols else m.col_labels,
                   row_name=m.row_name.replace("token", "word") if rows else m.row_name,
                   col_name=m.col_name.replace("token", "word") if cols else m.col_name,
                   source=m.source + "; words merged from character offsets")


def crop(m: Matrix, start: int, end: int, rows: bool = True) -> Matrix:
    """Keep token positions start..end-1 (of the columns, and of the rows unless rows=False)."""
    n = m.weights.shape[1]
    if not 0 <= start < end:
        raise ReadError(f"span {start}:{end} is empty; give START:END with START < END")
    if start >= n:
        raise ReadError(f"span {start}:{end} starts past the window's {n} tokens")
    end = min(end, n)
    w = m.weights[start:end, start:end] if rows else m.weights[:, start:end]
    return replace(m, weights=w, row_labels=m.row_labels[start:end] if rows else m.row_labels,
                   col_labels=m.col_labels[start:end], title=f"{m.title} [tokens {start}:{end}]")


def parse_head(head: str | int) -> int:
    """'mean' (or -1) is the mean over heads, stored as head = -1."""
    if isinstance(head, int):
        return head
    if str(head).strip().lower() in ("mean", "-1"):
        return -1
    try:
        return int(head)
    except ValueError:
        raise ReadError(f"head must be a head number or 'mean', got {head!r}") from None


def head_name(head: int) -> str:
    return "mean of heads" if head == -1 else f"head {head}"


def _layer_files(ds, table: str, layer: int | None, site: str | None = None) -> list[str]:
    """Committed files of `table`, only those of `layer` (and of the site folder `site`, in pair
    runs) when given."""
    return [str(ds.path / f["path"]) for _, r in sorted(ds.records.items()) for f in r["files"]
            if f["table"] == table and (layer is None or f.get("layer") in (None, layer))
            and (site is None or f.get("site") in (None, site))]


def _rows(ds, table: str, where: dict, layer: int | None = None):
    import pyarrow.dataset as pads

    from .dataset import _expression

    site = f"{where['stack']}-{where['attention']}" if "stack" in where and "attention" in where else None
    files = _layer_files(ds, table, layer, site)
    if not files:
        return None
    from ..store.verify import parquet_format

    data = pads.dataset(files, format=parquet_format())
    rows = data.to_table(filter=_expression(where, data.schema)).to_pandas()
    # Matrices are labelled with tokens: rows of word-level recipes (which index words) are left out.
    return rows[~rows["recipe_params"].str.contains('"level":"word"', regex=False)] if len(rows) else rows


SITES = ("encoder-self", "decoder-self", "decoder-cross")  # as `--site` names them


def parse_site(site: str | tuple | None) -> tuple[str, str] | None:
    """'decoder-cross' -> ("decoder", "cross"); None stays None (the dataset's default)."""
    if site is None or isinstance(site, tuple):
        return site
    if site not in SITES:
        raise ReadError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    stack, _, attention = site.partition("-")
    return stack, attention


def sides(ds, site: tuple[str, str] | None) -> tuple[str, str]:
    """(query side, key side) of a site's positions: target for a pair run's decoder queries and
    decoder self-attention keys, source otherwise."""
    if not ds.pairs or site is None or site[0] != "decoder":
        return "source", "source"
    return "target", "target" if site[1] == "self" else "source"


def window_tokens(ds, doc_id: str, window_index: int = 0, side: str = "source"):
    """The tokens of one window (one side) of a document; an empty document is named as such
    (it has a documents row with empty = true and no tokens), not as missing."""
    try:
        tokens = ds.tokens(doc_id, window_index)
        if "side" in tokens.columns:
            tokens = tokens[tokens["side"] == side].reset_index(drop=True)
        return tokens
    except ReadError:
        quoted = doc_id.replace("'", "''")
        found = ds.sql(f"SELECT empty, windows FROM documents WHERE doc_id = '{quoted}'")
        if len(found) and bool(found["empty"].iloc[0]):
            raise ReadError(f"document {doc_id!r} is empty: its text has no tokens, so there is no "
                            "attention to draw (its documents row says empty = true)") from None
        if len(found):
            raise ReadError(f"document {doc_id!r} has {int(found['windows'].iloc[0])} windows; "
                            f"window {window_index} is not one of them (windows count from 0)") from None
        raise


def attention_matrix(ds, doc_id: str, layer: int, head: int, window_index: int = 0,
                     recipe: str | None = None, site: str | tuple | None = None) -> Matrix:
    """One (query_pos, key_pos) matrix: from maps if stored there, else edges (sparse). `site`
    (encoder-self, decoder-self, decoder-cross) chooses the attention of a pair run (default
    encoder-self); a cross matrix is target tokens x source tokens."""
    layers = sorted({v for t in ("maps", "edges") if t in ds.tables for v in ds.tables[t]["layers"]})
    if layer not in layers:
        raise ReadError(f"layer {layer} is not stored in {ds.path}; layers with maps or edges: "
                        f"{', '.join(map(str, layers)) or 'none (the job had no edges or dense recipe)'}")
    site = parse_site(site) or (("encoder", "self") if ds.pairs else None)
    q_side, k_side = sides(ds, site)
    rows_tokens = window_tokens(ds, doc_id, window_index, q_side)
    labels = [clean_token(t) for t in rows_tokens["token"]]
    cols = labels if k_side == q_side else [clean_token(t) for t in window_tokens(ds, doc_id, window_index, k_side)["token"]]
    n, n_keys = len(labels), len(cols)
    where = {"doc_id": doc_id, "window_index": window_index, "layer": layer, "head": head}
    if site is not None:
        where.update(stack=site[0], attention=site[1])
    title = f"{doc_id} · layer {layer} · {head_name(head)}" + (f" · window {window_index}" if window_index else "")
    title += f" · {site[0]} {site[1]}-attention" if ds.pairs else ""
    names = {"row_name": f"{q_side} token", "col_name": f"{k_side} token"} if ds.pairs else {}
    if "maps" in ds.tables and recipe in (None, "dense"):
        maps = _rows(ds, "maps", where, layer)
        if maps is not None and len(maps):
            maps = maps[maps["recipe_params"] == maps["recipe_params"].iloc[0]]
            w = np.zeros((n, n_keys))  # causal rows stop at query_pos: later keys got no attention
            for q, row in zip(maps["query_pos"], maps["weights"]):
                w[q, :len(row)] = row
            return Matrix(w, labels, cols, title, "maps (dense)", **names)
    if "edges" in ds.tables:
        edges = _rows(ds, "edges", where, layer)
        if edges is not None and len(edges):
            if recipe is not None:
                edges = edges[edges["recipe"] == recipe]
            if len(edges):
                # The recipe/parameter set with the most rows here is the densest view.
                key = edges.groupby(["recipe", "recipe_params"]).size().idxmax()
                edges = edges[(edges["recipe"] == key[0]) & (edges["recipe_params"] == key[1])]
                w = np.full((n, n_keys), np.nan)
                w[edges["query_pos"].to_numpy(), edges["key_pos"].to_numpy()] = edges["weight"].to_numpy()
                params = ", ".join(f"{k}={v}" for k, v in json.loads(key[1]).items())
                return Matrix(w, labels, cols, title, f"edges, {key[0]} ({params}): sparse, blank = not stored",
                              **names)
    raise ReadError(f"no attention of {doc_id} window {window_index}, layer {layer}, {head_name(head)}"
                    f"{f', recipe {recipe}' if recipe else ''} in maps or edges; stored there: "
                    f"{available_heads(ds, doc_id, window_index, layer) or 'nothing for this layer'}")


def available_heads(ds, doc_id: str, window_index: int, layer: int) -> str:
    found = []
    for table in ("maps", "edges"):
        if table in ds.tables:
            rows = _rows(ds, table, {"doc_id": doc_id, "window_index": window_index, "layer": layer}, layer)
            if rows is not None and len(rows):
                heads = sorted(set(rows["head"]))
                found.append(f"{table} heads {', '.join('mean' if h == -1 else str(h) for h in heads)}")
    return "; ".join(found)


def find_token(tokens, token: str | int) -> int:
    """A position from a number, or the first token equal to `token` (a string)."""
    labels = [clean_token(t) for t in tokens["token"]]
    if isinstance(token, int) or str(token).lstrip("-").isdigit():
        pos = int(token)
        if not 0 <= pos < len(labels):
            raise ReadError(f"token position {pos} is outside the window's {len(labels)} tokens")
        return pos
    for pos, (raw, label) in enumerate(zip(tokens["token"], labels)):
        if token in (raw, label):
            return pos
    shown = " ".join(labels[:30]) + (" …" if len(labels) > 30 else "")
    raise ReadError(f"no token {token!r} in this window; its tokens: {shown}")


def rollout_matrix(ds, doc_id: str, token: str | int, window_index: int = 0) -> tuple[Matrix, object]:
    """(layers x key_pos) rollout weights of one query token, and the window's tokens."""
    if "rollout" not in ds.tables:
        raise ReadError(f"{ds.path} has no rollout table: add the rollout recipe to the job and run it")
    tokens = window_tokens(ds, doc_id, window_index)
    pos = find_token(tokens, token)
    where = {"doc_id": doc_id, "window_index": window_index, "query_pos": pos}
    if ds.pairs:  # the encoder's rollout, over the source tokens
        where.update(stack="encoder", attention="self")
    rows = _rows(ds, "rollout", where)
    if rows is None or rows.empty:
        raise ReadError(f"no rollout rows for {doc_id} window {window_index} token {pos}")
    rows = rows[rows["recipe_params"] == rows["recipe_params"].iloc[0]]
    layers = sorted(set(rows["layer"]))
    labels = [clean_token(t) for t in tokens["token"]]
    w = np.full((len(layers), len(labels)), np.nan)
    index = {layer: i for i, layer in enumerate(layers)}
    w[[index[v] for v in rows["layer"]], rows["key_pos"].to_numpy()] = rows["weight"].to_numpy()
    params = ", ".join(f"{k}={v}" for k, v in json.loads(rows["recipe_params"].iloc[0]).items())
    m = Matrix(w, [f"layer {v}" for v in layers], labels,
               f"{doc_id} · rollout of '{labels[pos]}' (position {pos})",
               f"rollout ({params}): top keys per layer, blank = not stored", row_name="rollout up to layer")
    return m, tokens
