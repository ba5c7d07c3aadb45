"""`attnpipe study distill`: how close is a student's attention to its teacher's, layer by layer?

Two runs over the same corpus (the same doc_ids with the same texts) are compared window by
window (windows paired by doc_id and window_index). When their tokenizers differ, both maps are
pooled onto the common character spans of the two tokenizations (align.py); with one tokenizer
the spans are the tokens and nothing changes.

Definitions, for teacher layer t and student layer s, over every query row r of every compared
window (P the teacher's row, Q the student's, on the same keys; natural logarithms):

- KL(P || Q) = sum_k P_k (log P_k - log Q_k), both clamped at 1e-12 inside the logarithm (a
  stored 0 would make it infinite); JS(P, Q) = KL(P || M) / 2 + KL(Q || M) / 2 with M = (P + Q) / 2
  (0 .. ln 2).
- kl, js: head-averaged, per head: the mean over heads h and rows r of KL(P_t,h,r || Q_s,h,r), as
  MiniLM's attention loss (KL per head and query row). Only when both models have as many heads.
- kl_headmean, js_headmean: of the head-mean rows (the mean over heads of each model), defined
  for any head counts (MiniLMv2 re-splits heads; the mean is the split-free comparison).
- best mapping: for each student layer the teacher layer of least divergence (`--metric`, kl when
  head counts match, else kl_headmean); monotone: the increasing assignment of teacher layers to
  student layers with the least total divergence (dynamic programming; non-decreasing when the
  student has more layers); uniform: TinyBERT's student layer i -> teacher layer (i + 1) * k - 1,
  k = teacher layers // student layers.

Dense maps give exact values. A run with only top-k edges is read as its stored keys plus the
leftover mass spread evenly over the other keys (attention_runs.py), an approximation: when both
runs have maps and edges, the study also computes every value from the edges of a sample of
windows and reports the error against the dense values of the same windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import ReadError
from .align import Side, align, pool
from .attention_runs import Key, Run, Source, open_run

EPS = 1e-12  # clamp inside log: a weight stored as 0 (or underflowed) keeps KL finite
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DistillOptions:
    metric: str = "kl"  # kl or js: the divergence the best mappings minimize
    sample: int = 32  # windows on which edges are checked against dense maps (seeded)
    seed: int = 0
    chunk: int = 64  # windows read at once: bounds memory on large runs


@dataclass
class Divergences:
    """Sums over compared rows, divided out by `table()`. Shapes: per head (teacher layers,
    student layers, heads), head mean (teacher layers, student layers)."""

    kl_head: np.ndarray | None
    js_head: np.ndarray | None
    kl_mean: np.ndarray
    js_mean: np.ndarray
    rows: int = 0
    windows: int = 0
    dropped_teacher: float = 0.0  # summed over rows: attention mass on tokens left out by alignment
    dropped_student: float = 0.0

    @classmethod
    def empty(cls, lt: int, ls: int, heads: int | None) -> "Divergences":
        per_head = (lambda: np.zeros((lt, ls, heads))) if heads else (lambda: None)
        return cls(per_head(), per_head(), np.zeros((lt, ls)), np.zeros((lt, ls)))

    def add(self, p: np.ndarray, q: np.ndarray) -> None:
        """One window: p (teacher layers, heads, rows, keys), q (student layers, heads, rows, keys)."""
        if self.kl_head is not None:
            kl, js = divergence_sums(p, q)
            self.kl_head += kl
            self.js_head += js
        kl, js = divergence_sums(p.mean(1, keepdims=True), q.mean(1, keepdims=True))
        self.kl_mean += kl[..., 0]
        self.js_mean += js[..., 0]
        self.rows += p.shape[2]
        self.windows += 1

    def table(self) -> pd.DataFrame:
        """One row per (teacher_layer, student_layer): the means over rows (and heads)."""
        lt, ls = self.kl_mean.shape
        t, s = np.meshgrid(np.arange(lt), np.arange(ls), indexing="ij")
        rows = max(self.rows, 1)
        out = {"teacher_layer": t.ravel(), "student_layer": s.ravel()}
        if self.kl_head is not None:
            out["kl"] = (self.kl_head.mean(-1) / rows).ravel()
            out["js"] = (self.js_head.mean(-1) / rows).ravel()
        out["kl_headmean"] = (self.kl_mean / rows).ravel()
        out["js_headmean"] = (self.js_mean / rows).ravel()
        return pd.DataFrame(out)

    def heads_table(self) -> pd.DataFrame | None:
        """One row per (teacher_layer, student_layer, head): per-head means over rows."""
        if self.kl_head is None:
            return None
        lt, ls, h = self.kl_head.shape
        t, s, hh = np.meshgrid(np.arange(lt), np.arange(ls), np.arange(h), indexing="ij")
        rows = max(self.rows, 1)
        return pd.DataFrame({"teacher_layer": t.ravel(), "student_layer": s.ravel(), "head": hh.ravel(),
                             "kl": (self.kl_head / rows).ravel(), "js": (self.js_head / rows).ravel()})


def divergence_sums(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KL(p || q) and JS(p, q) summed over rows, for every pair of layers: p (Lt, H, R, K) and
    q (Ls, H, R, K) give two (Lt, Ls, H) arrays."""
    logp, logq = np.log(np.maximum(p, EPS)), np.log(np.maximum(q, EPS))
    neg_entropy = np.einsum("ahrk,ahrk->ah", p, logp)  # sum_r sum_k p log p
    cross = np.einsum("ahrk,bhrk->abh", p, logq)
    kl = neg_entropy[:, None, :] - cross
    q_neg_entropy = _xlogx(q).sum((-1, -2))  # (Ls, H)
    js = np.empty_like(kl)
    for a in range(p.shape[0]):  # one teacher layer at a time: M is (Ls, H, R, K)
        m = (p[a][None] + q) / 2
        logm = np.log(np.maximum(m, EPS))
        js[a] = (neg_entropy[a][None] - np.einsum("hrk,bhrk->bh", p[a], logm)
                 + q_neg_entropy - (q * logm).sum((-1, -2))) / 2
    return kl, np.maximum(js, 0.0)


def _xlogx(x: np.ndarray) -> np.ndarray:
    return x * np.log(np.where(x > 0, x, 1.0))


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row (last axis), with the study's clamp."""
    return (p * (np.log(np.maximum(p, EPS)) - np.log(np.maximum(q, EPS)))).sum(-1)


# --- layer mappings --------------------------------------------------------------------------

def best_mapping(cost: np.ndarray) -> np.ndarray:
    """cost (student layers, teacher layers) -> each student layer's cheapest teacher layer."""
    return cost.argmin(1)


def monotone_mapping(cost: np.ndarray) -> np.ndarray:
    """The assignment of teacher layers to student layers, increasing (non-decreasing when the
    student has more layers than the teacher), of least total cost; dynamic programming."""
    ls, lt = cost.shape
    strict = ls <= lt
    total = np.full((ls, lt), np.inf)
    back = np.zeros((ls, lt), int)
    total[0] = cost[0]
    for i in range(1, ls):
        prev = total[i - 1]
        best_before = np.minimum.accumulate(prev)  # min over teacher layers <= j
        arg_before = np.array([int(np.argmin(prev[:j + 1])) for j in range(lt)])
        if strict:  # teacher layer strictly after the previous student layer's
            best_before = np.concatenate([[np.inf], best_before[:-1]])
            arg_before = np.concatenate([[0], arg_before[:-1]])
        total[i] = cost[i] + best_before
        back[i] = arg_before
    out = np.zeros(ls, int)
    out[-1] = int(np.argmin(total[-1]))
    for i in range(ls - 1, 0, -1):
        out[i - 1] = back[i, out[i]]
    return out


def uniform_mapping(student_layers: int, teacher_layers: int) -> np.ndarray:
    """TinyBERT's uniform map: student layer i -> teacher layer (i + 1) * k - 1, k = Lt // Ls
    (at least 1, capped at the last teacher layer)."""
    k = max(teacher_layers // student_layers, 1)
    return np.minimum((np.arange(student_layers) + 1) * k - 1, teacher_layers - 1)


def mapping_table(pairs: pd.DataFrame, column: str, lt: int, ls: int) -> pd.DataFrame:
    """One row per student layer: best, monotone and uniform teacher layers and their values."""
    cost = pairs.pivot(index="student_layer", columns="teacher_layer", values=column).to_numpy()
    rows = np.arange(ls)
    maps = {"best": best_mapping(cost), "monotone": monotone_mapping(cost), "uniform": uniform_mapping(ls, lt)}
    out = {"student_layer": rows}
    for name, teacher in maps.items():
        out[f"{name}_teacher_layer"] = teacher
        out[f"{name}_{column}"] = cost[rows, teacher]
    return pd.DataFrame(out)


# --- the study -------------------------------------------------------------------------------

@dataclass
class DistillResult:
    teacher: Run
    student: Run
    source: str  # maps (exact) or edges (approximate)
    metric: str  # the column the mappings minimize
    pairs: pd.DataFrame
    heads: pd.DataFrame | None
    mapping: pd.DataFrame
    windows: pd.DataFrame  # per compared window: tokens on each side, spans, dropped mass
    divergences: Divergences
    edges_error: pd.DataFrame | None = None  # per pair: dense vs edges on a sample
    notes: list[str] = field(default_factory=list)


def check_same_corpus(teacher: Run, student: Run) -> None:
    """Refuse two runs that did not read the same documents (doc_id and text sha1)."""
    t = teacher.documents.set_index("doc_id")["text_sha1"]
    s = student.documents.set_index("doc_id")["text_sha1"]
    only = sorted(set(t.index) ^ set(s.index))
    if only:
        where = "--teacher" if only[0] in t.index else "--student"
        raise ReadError(f"the runs did not read the same corpus: document {only[0]!r} is only in {where} "
                        f"({len(only)} documents in one run only); run both jobs on the same corpus")
    differ = t[t != s.reindex(t.index)]
    if len(differ):
        raise ReadError(f"the runs did not read the same corpus: document {differ.index[0]!r} has different "
                        f"text (text_sha1 {differ.iloc[0][:12]} in --teacher, {s[differ.index[0]][:12]} in --student)")


def pick_source(teacher: Run, student: Run) -> str:
    """maps when both runs have dense maps, else edges when both have them; else one line."""
    for table in ("maps", "edges"):
        if getattr(teacher, table) and getattr(student, table):
            return table
    for role, run in (("--teacher", teacher), ("--student", student)):
        if not (run.maps or run.edges):
            raise ReadError(f"{role} {run.path} has no token-level attention rows (maps of the dense recipe, or "
                            "edges of topk/threshold/topp); add a dense recipe to its job and run it again")
    raise ReadError(f"the runs have no attention table in common (--teacher: {_tables(teacher)}, --student: "
                    f"{_tables(student)}); give both the same recipe (dense for exact values)")


def _tables(run: Run) -> str:
    return " and ".join(t for t in ("maps", "edges") if getattr(run, t)) or "none"


def compare_window(p: np.ndarray, q: np.ndarray, a: Side, b: Side) -> tuple[np.ndarray, np.ndarray, dict]:
    """Teacher and student arrays of one window on their common spans, and what alignment did."""
    al = align(a, b)
    info = {"teacher_tokens": len(a), "student_tokens": len(b), "spans": al.spans, "aligned": not al.identity,
            "dropped_teacher": 0.0, "dropped_student": 0.0}
    if al.identity:
        return p, q, info
    p, lost_p = pool(p, al.span_a, al.spans)
    q, lost_q = pool(q, al.span_b, al.spans)
    info["dropped_teacher"], info["dropped_student"] = float(lost_p.mean()), float(lost_q.mean())
    return p, q, info


def study(teacher_path, student_path, options: DistillOptions = DistillOptions(),
          progress: Progress = lambda line: None) -> DistillResult:
    """Compare the attention of `teacher_path` and `student_path` (see the module's definitions)."""
    if options.metric not in ("kl", "js"):
        raise ReadError(f"--metric {options.metric!r}: use kl or js")
    teacher, student = open_run(teacher_path, "--teacher"), open_run(student_path, "--student")
    check_same_corpus(teacher, student)
    table = pick_source(teacher, student)
    st, ss = getattr(teacher, table), getattr(student, table)
    keys = sorted(set(teacher.windows(st)) & set(student.windows(ss)))
    if not keys:
        raise ReadError(f"no window has {table} rows in both runs (dense maps cover only windows up to the "
                        "recipe's max_tokens); raise max_tokens or compare shorter documents")
    equal_heads = st.per_head and ss.per_head and teacher.heads(st) == student.heads(ss)
    progress(f"comparing {len(keys)} windows from {table} ({teacher.layers} x {student.layers} layers, "
             f"{'per head and ' if equal_heads else ''}head mean)")
    div, windows = compare(teacher, student, st, ss, keys, equal_heads, options)
    pairs = div.table()
    metric = options.metric if equal_heads else f"{options.metric}_headmean"
    result = DistillResult(teacher, student, table, metric, pairs, div.heads_table(),
                           mapping_table(pairs, metric, teacher.layers, student.layers), windows, div)
    if not equal_heads:
        result.notes.append(f"head counts differ ({teacher.heads(st)} vs {student.heads(ss)}) or a run stored only "
                            "the head mean: compared on head-mean rows only")
    if table == "edges":
        result.notes.append("values from top-k edges (the leftover mass spread evenly over the other keys): "
                            "an approximation; store dense maps for exact values")
    elif teacher.edges and student.edges:
        per_head = equal_heads and teacher.edges.per_head and student.edges.per_head
        result.edges_error = edges_error(teacher, student, keys, per_head, options)
    return result


def compare(teacher: Run, student: Run, st: Source, ss: Source, keys: list[Key], equal_heads: bool,
            options: DistillOptions) -> tuple[Divergences, pd.DataFrame]:
    """Divergence sums over `keys`, read `options.chunk` windows at a time."""
    div = Divergences.empty(teacher.layers, student.layers, teacher.heads(st) if equal_heads else None)
    infos = []
    for i in range(0, len(keys), options.chunk):
        chunk = keys[i:i + options.chunk]
        pa_, qa = teacher.arrays(st, chunk), student.arrays(ss, chunk)
        for k in chunk:
            p, q, info = compare_window(pa_[k], qa[k], teacher.tokens[k], student.tokens[k])
            div.add(p, q)
            div.dropped_teacher += info["dropped_teacher"] * p.shape[2]
            div.dropped_student += info["dropped_student"] * p.shape[2]
            infos.append({"doc_id": k[0], "window_index": k[1], **info})
    return div, pd.DataFrame(infos)


def edges_error(teacher: Run, student: Run, keys: list[Key], equal_heads: bool,
                options: DistillOptions) -> pd.DataFrame:
    """On a seeded sample of windows: every value from edges beside the dense value of the same
    windows, and their difference (edges - dense)."""
    rng = np.random.default_rng(options.seed)
    sample = sorted(keys[i] for i in rng.choice(len(keys), min(options.sample, len(keys)), replace=False))
    dense, _ = compare(teacher, student, teacher.maps, student.maps, sample, equal_heads, options)
    approx, _ = compare(teacher, student, teacher.edges, student.edges, sample, equal_heads, options)
    d, e = dense.table(), approx.table()
    out = d[["teacher_layer", "student_layer"]].copy()
    for col in d.columns[2:]:
        out[f"{col}_dense"] = d[col]
        out[f"{col}_edges"] = e[col]
        out[f"{col}_error"] = e[col] - d[col]
    out.attrs["windows"] = len(sample)
    return out
