"""The tables a grounding study reads, as per-step arrays, and means of them over spans of steps.

A generation of n tokens has steps 0 .. n-1; step s is the decoding step that produced generated
token s, and its query is the token before it (the prompt's last token at s = 0). Rows of the
arrays here are (doc_id, step) in that order, so the steps of one generation are one block of
rows; the per-head columns are (layer, head) pairs named `L{layer}H{head}`.

Means over a span of steps are read off running sums (prefix sums): a span [s, e) of a
generation whose block starts at row r has the mean (C[r + e] - C[r + s]) / (e - s). Every span
costs two lookups, whatever its length, and no Python loop runs over steps or heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError

# The columns the study reads; only decoder self-attention rows of the grounding table.
GROUNDING_COLUMNS = ["doc_id", "step", "layer", "head", "lookback_ratio", "self_mass"]
DECODER_SELF = {"stack": "decoder", "attention": "self"}
GENERATION_COLUMNS = ["doc_id", "step", "char_start", "char_end", "logprob", "entropy"]
# Where the attention diagonal is 0 its log is -inf: clamped here, as AttnLogDet-style scores do.
LOG_FLOOR = 1e-12
HEAD_KEYS = 1 << 16  # (layer, head) as one integer: head is an int16 column


@dataclass
class Tables:
    """What a study reads from one dataset: three tables as DataFrames, and provenance."""

    grounding: pd.DataFrame  # GROUNDING_COLUMNS, decoder self-attention rows
    generations: pd.DataFrame  # GENERATION_COLUMNS
    texts: pd.Series  # documents.generated_text, indexed by doc_id (generate runs only)
    provenance: dict
    path: str


def read_tables(path: str | Path) -> Tables:
    """Read the grounding, generations and documents tables of the dataset at `path` through the
    read API (committed files only, checked against their records first). The one place a study
    touches a dataset: everything after works on the DataFrames."""
    from ..read import open_dataset
    from ..store.verify import check_committed

    with open_dataset(path) as ds:
        check_committed(ds.path, ds.records)
        for table in ("generations", "grounding"):
            if table not in ds.tables:
                raise ReadError(f"{ds.path} has no {table} table: a grounding study reads the output of a "
                                f"generate run (a job with [generate]); its tables: {', '.join(ds.tables)}")
        grounding = ds.to_arrow("grounding", DECODER_SELF, GROUNDING_COLUMNS)
        generations = ds.to_arrow("generations", columns=GENERATION_COLUMNS)
        documents = ds.to_pandas("documents", columns=["doc_id", "generated_text"])
        # doc_id as a dictionary: one string per generation instead of one per (step, layer, head).
        return Tables(grounding=grounding.to_pandas(categories=["doc_id"]),
                      generations=generations.to_pandas(),
                      texts=documents.dropna(subset=["generated_text"]).set_index("doc_id")["generated_text"],
                      provenance=ds.provenance, path=str(ds.path))


@dataclass
class StepArrays:
    """Running sums over the (doc_id, step) rows of a dataset's generations.

    docs        one row per generation (index doc_id): `offset`, its first row, and `steps`
    features    `L{layer}H{head}` of every column of the per-head sums, layers then heads in order
    lookback    (rows + 1, heads) running sums of lookback_ratio; null ratios count as 0 ...
    defined     (rows + 1, heads) ... and are not counted here, so means are over defined values
    logdiag     (rows + 1,) running sums of the step's mean over heads of log(max(self_mass, 1e-12))
    logprob     (rows + 1,) running sums of the generated token's log-probability
    entropy     (rows + 1,) running sums of the next-token distribution's entropy (nats)
    """

    docs: pd.DataFrame
    features: list[str]
    layer_head: np.ndarray  # (heads, 2): layer and head of each feature
    lookback: np.ndarray
    defined: np.ndarray
    logdiag: np.ndarray
    logprob: np.ndarray
    entropy: np.ndarray

    def rows(self, doc_ids: pd.Series, start: pd.Series, end: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """Row bounds [first, last) of the spans [start, end) of steps of `doc_ids`."""
        offset = self.docs["offset"].reindex(doc_ids).to_numpy()
        return offset + start.to_numpy(), offset + end.to_numpy()

    def head_means(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(spans, heads): each head's mean lookback ratio over each span's steps (NaN where the
        head's ratio is null at every step of the span)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.lookback[hi] - self.lookback[lo]) / (self.defined[hi] - self.defined[lo])

    def overall_lookback(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(spans,): the mean lookback ratio over each span's steps and every layer and head."""
        total = (self.lookback[hi] - self.lookback[lo]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / (self.defined[hi] - self.defined[lo]).sum(axis=1)

    def step_mean(self, sums: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(spans,): the mean of a per-step quantity (logdiag, logprob, entropy) over each span."""
        return (sums[hi] - sums[lo]) / (hi - lo)


def step_arrays(tables: Tables) -> StepArrays:
    """The running sums of `tables`. Raises ReadError when the grounding table does not hold
    exactly one row per generated step, layer and head."""
    gen = tables.generations.sort_values(["doc_id", "step"], ignore_index=True)
    docs = _doc_blocks(gen, tables.path)
    g = tables.grounding
    if g.empty:
        raise ReadError(f"{tables.path}: the grounding table has no decoder self-attention rows")
    layer_head, col = _features(g["layer"].to_numpy(np.int64), g["head"].to_numpy(np.int64))
    features = [f"L{layer}H{head}" for layer, head in layer_head]
    rows = len(gen)
    row = _grounding_rows(g, docs, tables.path)
    _check_complete(row, col, docs, features, tables.path)
    ratio = np.full((rows, len(features)), np.nan)
    ratio[row, col] = g["lookback_ratio"].to_numpy(np.float64, na_value=np.nan)
    logdiag = np.zeros((rows, len(features)))
    logdiag[row, col] = np.log(np.maximum(g["self_mass"].to_numpy(np.float64, na_value=np.nan), LOG_FLOOR))
    return StepArrays(docs=docs, features=features, layer_head=layer_head,
                      lookback=_running(np.nan_to_num(ratio, nan=0.0)),
                      defined=_running(~np.isnan(ratio)),
                      logdiag=_running(logdiag.mean(axis=1)),
                      logprob=_running(gen["logprob"].to_numpy(np.float64)),
                      entropy=_running(gen["entropy"].to_numpy(np.float64)))


def _running(values: np.ndarray) -> np.ndarray:
    """Running sums along rows with a leading row of zeros: out[i] = sum of values[:i]."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros((len(values) + 1, *values.shape[1:]))
    np.cumsum(values, axis=0, out=out[1:])
    return out


def _doc_blocks(gen: pd.DataFrame, path: str) -> pd.DataFrame:
    """Each generation's first row and step count; its steps must be 0 .. n-1, once each."""
    docs = gen.groupby("doc_id", sort=False, observed=True)["step"].agg(["size", "min", "max"])
    bad = docs[(docs["min"] != 0) | (docs["max"] != docs["size"] - 1)]
    if len(bad):
        raise ReadError(f"{path}: the generations of {bad.index[0]!r} do not have steps 0 .. n-1 once each "
                        f"({bad['size'].iloc[0]} rows, steps {bad['min'].iloc[0]} .. {bad['max'].iloc[0]})")
    offset = np.concatenate([[0], np.cumsum(docs["size"].to_numpy())[:-1]])
    return pd.DataFrame({"offset": offset, "steps": docs["size"].to_numpy()}, index=docs.index.astype(str))


def _grounding_rows(g: pd.DataFrame, docs: pd.DataFrame, path: str) -> np.ndarray:
    """The (doc_id, step) row of each grounding row."""
    ids = g["doc_id"]
    if isinstance(ids.dtype, pd.CategoricalDtype):  # as read: look up each distinct id once
        at = docs.index.get_indexer(ids.cat.categories.astype(str))[ids.cat.codes.to_numpy()]
    else:
        at = docs.index.get_indexer(ids.astype(str))
    step = g["step"].to_numpy(np.int64)
    if (at < 0).any():
        raise ReadError(f"{path}: the grounding table has rows of {g['doc_id'].iloc[int(np.argmax(at < 0))]!r}, "
                        "which has no generations rows")
    n = docs["steps"].to_numpy()[at]
    outside = (step < 0) | (step >= n)
    if outside.any():
        i = int(np.argmax(outside))
        raise ReadError(f"{path}: the grounding table has step {step[i]} of {g['doc_id'].iloc[i]!r}, which "
                        f"generated {n[i]} tokens")
    return docs["offset"].to_numpy()[at] + step


def _features(layer: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (layer, head) pairs in order, as a (heads, 2) array, and each row's column."""
    key = layer * HEAD_KEYS + head
    keys, col = np.unique(key, return_inverse=True)
    return np.stack([keys // HEAD_KEYS, keys % HEAD_KEYS], axis=1), col


def _check_complete(row: np.ndarray, col: np.ndarray, docs: pd.DataFrame, features: list[str], path: str) -> None:
    """Every (step, head) cell exactly once: a study of a partial table would average different
    steps for different heads."""
    rows = int(docs["steps"].sum())
    seen = np.bincount(row * len(features) + col, minlength=rows * len(features))
    if (seen != 1).any():
        cell = int(np.argmax(seen != 1))
        r, c = divmod(cell, len(features))
        d = int(np.searchsorted(docs["offset"].to_numpy(), r, side="right")) - 1
        raise ReadError(f"{path}: the grounding table has {seen[cell]} rows for {docs.index[d]!r} step "
                        f"{r - docs['offset'].iloc[d]} head {features[c]}; a study needs exactly one for every "
                        "generated step, layer and head")
