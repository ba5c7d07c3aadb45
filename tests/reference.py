"""Plain reference implementations of every recipe, written from the recipes' docstrings with
explicit Python loops in float64 (numpy), plus comparators for the recipes' column outputs.

Shared by tests/test_recipes.py (random maps) and tests/test_recipes_eager.py (HF eager maps).

Inputs: `probs` (batch, head, query_pos, key_pos) array-like; `m` a `Masks` with numpy arrays.
Only positions below a document's length (and, when causal, keys <= query) are ever read, so
whatever sits in padded or future entries cannot influence a reference result.

Edge-type references (topk, threshold, topp, rollout) return an `EdgeRef`: for every candidate
(batch, head, query, key) a reference weight and a status: IN (must be present), OUT (must be
absent) or MAYBE (within `tie` of a decision boundary, so float32-vs-float64 rounding may decide
it either way). Tests on random maps assert that no MAYBE occurs, i.e. they compare exact sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HEAD_MEAN = -1
IN, OUT, MAYBE = "in", "out", "maybe"


@dataclass
class Masks:
    lengths: np.ndarray  # (batch,) int
    special: np.ndarray  # (batch, pos) bool
    sep: np.ndarray  # (batch, pos) bool
    punct: np.ndarray  # (batch, pos) bool
    causal: bool
    keys: "Masks | None" = None  # cross-attention: the key side (source); the fields above: queries


def keys_seen(m: Masks, b: int, q: int) -> list[int]:
    """Key positions query q of document b may attend to (cross-attention: every source token)."""
    if m.keys is not None:
        return list(range(int(m.keys.lengths[b])))
    n = int(m.lengths[b])
    return list(range(q + 1)) if m.causal else list(range(n))


def weight_rows(probs, m: Masks, per_head: bool):
    """Yield (b, head_label, q, {key: weight}) for every real query, in float64.

    per_head=False: one row per query, the plain mean over heads (head_label = -1)."""
    p = np.asarray(probs, dtype=np.float64)
    batch, heads = p.shape[:2]
    for b in range(batch):
        n = int(m.lengths[b])
        for q in range(n):
            keys = keys_seen(m, b, q)
            if per_head:
                for h in range(heads):
                    yield b, h, q, {k: float(p[b, h, q, k]) for k in keys}
            else:
                row = {}
                for k in keys:
                    total = 0.0
                    for h in range(heads):
                        total += float(p[b, h, q, k])
                    row[k] = total / heads
                yield b, HEAD_MEAN, q, row


@dataclass
class EdgeRef:
    status: dict = field(default_factory=dict)  # (b, h, q, key) -> IN / OUT / MAYBE
    weight: dict = field(default_factory=dict)  # (b, h, q, key) -> float64 reference weight
    count: dict = field(default_factory=dict)  # (b, h, q) -> exact number of keys (topk only)

    def add(self, b, h, q, key, w, status):
        self.status[(b, h, q, key)] = status
        self.weight[(b, h, q, key)] = w

    @property
    def n_maybe(self) -> int:
        return sum(s == MAYBE for s in self.status.values())

    @property
    def n_in(self) -> int:
        return sum(s == IN for s in self.status.values())


def _topk_row(ref: EdgeRef, b, h, q, row: dict, k: int, tie: float):
    for key, w in row.items():
        above_surely = sum(1 for o, v in row.items() if o != key and v > w + tie)
        above_maybe = sum(1 for o, v in row.items() if o != key and v >= w - tie)
        if above_maybe < k:
            status = IN
        elif above_surely >= k:
            status = OUT
        else:
            status = MAYBE
        ref.add(b, h, q, key, w, status)
    ref.count[(b, h, q)] = min(k, len(row))


def ref_topk(probs, m: Masks, *, k: int, per_head: bool, tie: float = 0.0) -> EdgeRef:
    """The k strongest keys of every query (all of them when it sees fewer than k)."""
    ref = EdgeRef()
    for b, h, q, row in weight_rows(probs, m, per_head):
        _topk_row(ref, b, h, q, row, k, tie)
    return ref


def ref_threshold(probs, m: Masks, *, t: float, per_head: bool, tie: float = 0.0) -> EdgeRef:
    """Pairs whose weight is strictly greater than t."""
    ref = EdgeRef()
    for b, h, q, row in weight_rows(probs, m, per_head):
        for key, w in row.items():
            if 0 < abs(w - t) <= tie:
                status = MAYBE
            else:
                status = IN if w > t else OUT
            ref.add(b, h, q, key, w, status)
    return ref


def ref_topp(probs, m: Masks, *, p: float, per_head: bool, tie: float = 0.0) -> EdgeRef:
    """Smallest set of keys, strongest first, whose weights add up to at least p; a key is needed
    iff the mass of the strictly stronger keys is still below p. Zero-weight keys never kept."""
    ref = EdgeRef()
    for b, h, q, row in weight_rows(probs, m, per_head):
        for key, w in row.items():
            if w <= 0:
                ref.add(b, h, q, key, w, OUT)
                continue
            before_surely = sum(v for o, v in row.items() if o != key and v > w + tie)
            before_maybe = sum(v for o, v in row.items() if o != key and v >= w - tie)
            if before_maybe < p - tie:
                status = IN
            elif before_surely >= p + tie:
                status = OUT
            else:
                status = MAYBE
            ref.add(b, h, q, key, w, status)
    return ref


def ref_rollout_matrices(layers: list, m: Masks) -> list[dict[int, np.ndarray]]:
    """Per layer, per document b: the (n, n) rolled-out matrix on the document's real tokens.

    A = head mean (future keys zero when causal); M = 0.5*A + 0.5*I with rows renormalised;
    R_0 = M_0, R_l = M_l @ R_{l-1}."""
    out, carry = [], None
    for probs in layers:
        p = np.asarray(probs, dtype=np.float64)
        heads = p.shape[1]
        rolled = {}
        for b in range(p.shape[0]):
            n = int(m.lengths[b])
            mixed = np.zeros((n, n))
            for q in range(n):
                for k in keys_seen(m, b, q):
                    mixed[q, k] = 0.5 * sum(p[b, h, q, k] for h in range(heads)) / heads
                mixed[q, q] += 0.5
                mixed[q] /= mixed[q].sum()
            if carry is None:
                rolled[b] = mixed
            else:
                prod = np.zeros((n, n))
                for i in range(n):
                    for j in range(n):
                        prod[i, j] = sum(mixed[i, x] * carry[b][x, j] for x in range(n))
                rolled[b] = prod
        out.append(rolled)
        carry = rolled
    return out


def ref_rollout(layers: list, m: Masks, *, k: int, tie: float = 0.0) -> list[EdgeRef]:
    """Top k keys per query of each layer's rolled-out map (head = -1 in the EdgeRef keys)."""
    refs = []
    for rolled in ref_rollout_matrices(layers, m):
        ref = EdgeRef()
        for b, mat in rolled.items():
            for q in range(int(m.lengths[b])):
                row = {key: float(mat[q, key]) for key in keys_seen(m, b, q)}
                _topk_row(ref, b, HEAD_MEAN, q, row, k, tie)
        refs.append(ref)
    return refs


def ref_dense(probs, m: Masks, *, max_tokens: int, per_head: bool) -> dict:
    """(b, head, q) -> weights of keys 0..n-1 (causal: 0..q), windows of <= max_tokens only."""
    out = {}
    for b, h, q, row in weight_rows(probs, m, per_head):
        if int(m.lengths[b]) <= max_tokens and int((m.keys or m).lengths[b]) <= max_tokens:
            out[(b, h, q)] = np.array([row[key] for key in sorted(row)])
    return out


STATS = ["entropy", "entropy_norm", "first_mass", "sep_mass", "special_mass", "self_mass",
         "prev_mass", "next_mass", "punct_mass", "mean_distance"]
CROSS_UNDEFINED = ["self_mass", "prev_mass", "next_mass", "mean_distance"]  # two sequences' positions


def ref_head_stats(probs, m: Masks) -> dict:
    """(b, h) -> {"window_tokens": n, stat: mean over the n real queries of the per-query value};
    cross-attention: key sets of the source, and self/prev/next/distance None (not defined)."""
    p = np.asarray(probs, dtype=np.float64)
    km = m.keys or m
    out = {}
    for b in range(p.shape[0]):
        n = int(m.lengths[b])
        for h in range(p.shape[1]):
            sums = dict.fromkeys(STATS, 0.0)
            for q in range(n):
                keys = keys_seen(m, b, q)
                w = {k: float(p[b, h, q, k]) for k in keys}
                entropy = -sum(v * math.log(v) for v in w.values() if v > 0)
                sums["entropy"] += entropy
                sums["entropy_norm"] += entropy / math.log(len(keys)) if len(keys) > 1 else 0.0
                sums["first_mass"] += w.get(0, 0.0)
                sums["sep_mass"] += sum(v for k, v in w.items() if km.sep[b, k])
                sums["special_mass"] += sum(v for k, v in w.items() if km.special[b, k])
                sums["self_mass"] += w.get(q, 0.0)
                sums["prev_mass"] += w.get(q - 1, 0.0)
                sums["next_mass"] += w.get(q + 1, 0.0)
                sums["punct_mass"] += sum(v for k, v in w.items() if km.punct[b, k])
                sums["mean_distance"] += sum(v * abs(q - k) for k, v in w.items())
            out[(b, h)] = {"window_tokens": n, **{s: sums[s] / n for s in STATS}}
            if m.keys is not None:
                out[(b, h)].update(dict.fromkeys(CROSS_UNDEFINED))
    return out


# ---------------------------------------------------------------------------------------------
# Comparators: recipe columns (numpy or torch) against a reference.


def to_numpy(cols: dict) -> dict[str, np.ndarray]:
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
            for k, v in cols.items()}


def edges_of(cols: dict, with_head: bool = True) -> dict:
    """(b, h, q, key) -> weight of recipe output rows; asserts there are no duplicate rows."""
    c = to_numpy(cols)
    n = len(c["batch_index"])
    for name in ("query_pos", "key_pos", "weight"):
        assert len(c[name]) == n, f"column {name} has {len(c[name])} rows, expected {n}"
    heads = c["head"] if with_head else np.full(n, HEAD_MEAN)
    got = {}
    for b, h, q, k, w in zip(c["batch_index"], heads, c["query_pos"], c["key_pos"], c["weight"]):
        key = (int(b), int(h), int(q), int(k))
        assert key not in got, f"duplicate edge row {key}"
        got[key] = float(w)
    return got


def assert_edges(cols: dict, ref: EdgeRef, atol: float, with_head: bool = True) -> None:
    got = edges_of(cols, with_head)
    missing = [e for e, s in ref.status.items() if s == IN and e not in got]
    assert not missing, f"{len(missing)} expected edges missing, e.g. {sorted(missing)[:5]}"
    extra = [e for e in got if ref.status.get(e, OUT) == OUT]
    assert not extra, f"{len(extra)} unexpected edges, e.g. {sorted(extra)[:5]}"
    bad = [(e, w, ref.weight[e]) for e, w in got.items() if abs(w - ref.weight[e]) > atol]
    assert not bad, f"{len(bad)} weights off by more than {atol}, e.g. {bad[:5]}"
    if ref.count:
        per_row: dict = {}
        for (b, h, q, _k) in got:
            per_row[(b, h, q)] = per_row.get((b, h, q), 0) + 1
        wrong = [(r, per_row.get(r, 0), n) for r, n in ref.count.items() if per_row.get(r, 0) != n]
        assert not wrong, f"rows with the wrong number of keys (row, got, expected): {wrong[:5]}"


def assert_dense(cols: dict, ref: dict, atol: float) -> None:
    c = to_numpy(cols)
    lengths = c["weights.lengths"]
    values = c["weights.values"]
    assert len(c["batch_index"]) == len(c["head"]) == len(c["query_pos"]) == len(lengths)
    assert int(lengths.sum()) == len(values), "weights.values does not match weights.lengths"
    got, start = {}, 0
    for b, h, q, n in zip(c["batch_index"], c["head"], c["query_pos"], lengths):
        key = (int(b), int(h), int(q))
        assert key not in got, f"duplicate dense row {key}"
        got[key] = values[start:start + int(n)].astype(np.float64)
        start += int(n)
    assert set(got) == set(ref), (f"dense rows differ: missing {sorted(set(ref) - set(got))[:5]}, "
                                  f"extra {sorted(set(got) - set(ref))[:5]}")
    for key, want in ref.items():
        assert len(got[key]) == len(want), f"row {key}: {len(got[key])} weights, want {len(want)}"
        np.testing.assert_allclose(got[key], want, atol=atol, rtol=0, err_msg=f"dense row {key}")


def assert_head_stats(cols: dict, ref: dict, atol: float) -> None:
    c = to_numpy(cols)
    n = len(c["batch_index"])
    assert n == len(ref), f"{n} head_stats rows, expected {len(ref)}"
    seen = set()
    for i in range(n):
        key = (int(c["batch_index"][i]), int(c["head"][i]))
        assert key in ref and key not in seen, f"unexpected or duplicate head_stats row {key}"
        seen.add(key)
        want = ref[key]
        assert int(c["window_tokens"][i]) == want["window_tokens"], f"window_tokens of {key}"
        for s in STATS:
            if want[s] is None:
                assert s not in c, f"{s} is not defined here (cross-attention) but was computed"
                continue
            assert abs(float(c[s][i]) - want[s]) <= atol, (
                f"{s} of (batch, head) {key}: got {float(c[s][i])}, expected {want[s]}")
