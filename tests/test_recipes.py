"""Every recipe against a plain float64 reference (tests/reference.py) on random attention maps.

The batch has documents of varied length: a one-token document, a full-length one and some in
between, several heads, both bidirectional and causal masks. Over the valid keys (real, and not
future when causal) each real query row is a softmax of random logits, with a few valid keys at
exactly zero weight. Every invalid entry (padded query rows, padded keys, future keys) holds
uniform random garbage (or NaN, or model-like zeros in the variant tests), so any leak of padding
shows up as a wrong or extra row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnpipe.recipes import RECIPES, BatchMasks, LayerAttention, validate_recipe

import reference as ref

# Recipes compute in float32 from float32 maps, the reference in float64 from the same values:
# weights differ by float32 rounding only (~1e-7), so 1e-6 is a safe bound.
EDGE_ATOL = 1e-6
# Statistics sum up to 12 float32 terms of size up to ~11 (mean_distance); observed error is
# ~2e-7, so 2e-6 leaves a 10x margin.
STAT_ATOL = 2e-6
# Decision-boundary margin used to *detect* near-ties; random maps must have none (see n_maybe).
TIE = 1e-6

LENGTHS = [7, 1, 12, 4, 9]  # a one-token document and a full-length one (size 12)
SIZE, HEADS = 12, 3
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])


def random_batch(causal: bool, seed: int = 0, layers: int = 1, lengths=LENGTHS, size=SIZE,
                 heads=HEADS, garbage: bool = True):
    """(list of float32 maps (batch, head, q, k), torch BatchMasks, reference Masks).

    garbage=True: every invalid entry (padded query row, padded key, future key) holds random
    values, so recipes must mask them; False: model-like exact zeros on invalid keys of real rows.
    """
    rng = np.random.default_rng(seed + (1000 if causal else 0))
    lengths = np.array(lengths)
    batch = len(lengths)
    pos = np.arange(size)
    token_valid = pos[None, :] < lengths[:, None]
    pair_valid = token_valid[:, :, None] & token_valid[:, None, :]
    if causal:
        pair_valid &= np.tril(np.ones((size, size), dtype=bool))
    valid = np.broadcast_to(pair_valid[:, None], (batch, heads, size, size))
    maps = []
    for _ in range(layers):
        logits = rng.normal(0.0, 1.5, (batch, heads, size, size))
        # Some valid pairs get exactly zero weight (they are still keys the query sees), only in
        # rows that keep >= 4 non-zero keys, so top-3 never has to choose among zero-weight ties.
        zero = valid & (rng.random(valid.shape) < 0.15)
        zero &= ((valid & ~zero).sum(-1, keepdims=True) >= 4) & (valid.sum(-1, keepdims=True) >= 8)
        logits = np.where(valid & ~zero, logits, -np.inf)
        with np.errstate(invalid="ignore"):
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs = probs / probs.sum(-1, keepdims=True)
        if garbage:  # padded query rows, padded keys and future keys: arbitrary values in [0, 1)
            probs = np.where(valid, probs, rng.uniform(0.0, 1.0, probs.shape))
        else:  # what a model gives: zero on padded/future keys, padded query rows still garbage
            probs = np.where(valid, probs, 0.0)
            padded_query = ~token_valid[:, None, :, None] & np.ones_like(valid)
            probs = np.where(padded_query, rng.uniform(0.0, 1.0, probs.shape), probs)
        assert np.isfinite(probs).all()
        assert np.allclose(np.where(valid, probs, 0.0).sum(-1)[valid.any(-1)], 1.0)
        maps.append(torch.tensor(probs, dtype=torch.float32))
    flags = [(rng.random((batch, size)) < 0.3) & token_valid for _ in range(3)]
    flags[0][:, 0] = token_valid[:, 0]  # like [CLS]: position 0 is special
    special, sep, punct = flags
    masks = BatchMasks(torch.tensor(lengths), torch.tensor(special), torch.tensor(sep),
                       torch.tensor(punct), causal)
    ref_masks = ref.Masks(lengths, special, sep, punct, causal)
    return maps, masks, ref_masks


def run(name: str, att: LayerAttention, carry=None, **params):
    spec = validate_recipe({"name": name, **params}, "test")
    recipe = RECIPES[spec["name"]]
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if recipe.stateful:
        return recipe.fn(att, carry, **kwargs)
    return recipe.fn(att, **kwargs)


def layer(causal: bool, seed: int = 0):
    maps, masks, ref_masks = random_batch(causal, seed)
    return LayerAttention(maps[0], 0, masks), maps[0].double().numpy(), ref_masks


def test_every_recipe_is_covered():
    """A new recipe must get a reference here, or in the test file named below, before it ships."""
    elsewhere = {"groups": "test_groups.py", "attn_grad": "test_saliency.py", "attn_grad_heads": "test_saliency.py",
                 "attn_ig": "test_saliency.py", "attn_ig_heads": "test_saliency.py",
                 "grad_rollout": "test_saliency.py"}
    assert set(RECIPES) - set(elsewhere) == {"head_stats", "topk", "threshold", "topp", "rollout", "dense"}
    assert all((Path(__file__).parent / f).is_file() for f in elsewhere.values())


@CAUSAL
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("k", [1, 3, 50])  # 50 > every sequence length
def test_topk(causal, per_head, k):
    att, probs, m = layer(causal)
    expected = ref.ref_topk(probs, m, k=k, per_head=per_head, tie=TIE)
    assert expected.n_maybe == 0
    ref.assert_edges(run("topk", att, k=k, per_head=per_head), expected, EDGE_ATOL)
    if k == 50:  # every valid pair, nothing else
        assert expected.n_in == len(expected.status)


@CAUSAL
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("t", [0.0, 0.15, 1.0])
def test_threshold(causal, per_head, t):
    att, probs, m = layer(causal)
    expected = ref.ref_threshold(probs, m, t=t, per_head=per_head, tie=TIE)
    assert expected.n_maybe == 0
    cols = run("threshold", att, t=t, per_head=per_head)
    ref.assert_edges(cols, expected, EDGE_ATOL)
    if t == 1.0:
        assert len(cols["query_pos"]) == 0  # weights are at most 1: no rows at all
    if t == 0.0:  # every valid pair with any weight; the zero-weight ones (there are some) not
        positive = sum(w > 0 for w in expected.weight.values())
        assert expected.n_in == positive
        assert per_head is False or positive < len(expected.status)
    if t == 0.15:
        assert 0 < expected.n_in < len(expected.status)


@CAUSAL
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("p", [1.0, 0.6, 0.05])
def test_topp(causal, per_head, p):
    att, probs, m = layer(causal)
    expected = ref.ref_topp(probs, m, p=p, per_head=per_head, tie=TIE)
    assert expected.n_maybe == 0
    ref.assert_edges(run("topp", att, p=p, per_head=per_head), expected, EDGE_ATOL)
    if p == 1.0:  # every key with weight is needed to reach the full mass; zero-weight ones not
        positive = sum(w > 0 for w in expected.weight.values())
        assert expected.n_in == positive
        assert per_head is False or positive < len(expected.status)
    if p == 0.05:  # the strongest key alone always covers 5% of a row of <= 12 keys
        rows = {e[:3] for e in expected.status}
        assert expected.n_in == len(rows)


@CAUSAL
@pytest.mark.parametrize("k", [2, 50])
def test_rollout_three_layers(causal, k):
    maps, masks, m = random_batch(causal, seed=3, layers=3)
    expected = ref.ref_rollout([p.double().numpy() for p in maps], m, k=k, tie=TIE)
    carry = None
    for i, probs in enumerate(maps):
        cols, carry = run("rollout", LayerAttention(probs, i, masks), carry, k=k)
        assert "head" not in cols
        assert expected[i].n_maybe == 0
        ref.assert_edges(cols, expected[i], EDGE_ATOL, with_head=False)


@CAUSAL
def test_rollout_rows_stay_distributions(causal):
    """Each rolled-out row of a real query is a distribution over its visible keys (k = all)."""
    maps, masks, m = random_batch(causal, seed=4, layers=3)
    carry = None
    for i, probs in enumerate(maps):
        cols, carry = run("rollout", LayerAttention(probs, i, masks), carry, k=SIZE)
        got = ref.edges_of(cols, with_head=False)
        for b, n in enumerate(m.lengths):
            for q in range(n):
                total = sum(w for (bb, _h, qq, _k), w in got.items() if bb == b and qq == q)
                assert abs(total - 1.0) <= 1e-5, (i, b, q, total)


@CAUSAL
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "head_mean"])
@pytest.mark.parametrize("max_tokens", [7, 64])  # 7: exactly one document's length (inclusive)
def test_dense(causal, per_head, max_tokens):
    att, probs, m = layer(causal)
    expected = ref.ref_dense(probs, m, max_tokens=max_tokens, per_head=per_head)
    cols = run("dense", att, max_tokens=max_tokens, per_head=per_head)
    ref.assert_dense(cols, expected, EDGE_ATOL)
    c = ref.to_numpy(cols)
    for b, q, n in zip(c["batch_index"], c["query_pos"], c["weights.lengths"]):
        assert n == (q + 1 if causal else m.lengths[b])
    docs = set(c["batch_index"].tolist())
    assert docs == {b for b, n in enumerate(m.lengths) if n <= max_tokens}
    if not per_head:
        assert (c["head"] == -1).all()


@CAUSAL
def test_head_stats(causal):
    att, probs, m = layer(causal)
    expected = ref.ref_head_stats(probs, m)
    ref.assert_head_stats(run("head_stats", att), expected, STAT_ATOL)
    # the one-token document sees a single key: zero entropy, all mass on itself and on position 0
    one = int(np.flatnonzero(m.lengths == 1)[0])
    for h in range(HEADS):
        assert expected[(one, h)]["entropy_norm"] == 0.0
        assert expected[(one, h)]["self_mass"] == pytest.approx(1.0)


def _all_outputs(att: LayerAttention, carry):
    yield "head_stats", run("head_stats", att)
    for per_head in (True, False):
        yield "topk", run("topk", att, k=5, per_head=per_head)
        yield "threshold", run("threshold", att, t=0.0, per_head=per_head)
        yield "topp", run("topp", att, p=0.95, per_head=per_head)
        yield "dense", run("dense", att, max_tokens=64, per_head=per_head)
    cols, carry = run("rollout", att, carry, k=SIZE)
    yield "rollout", cols
    yield "carry", carry


@CAUSAL
@pytest.mark.parametrize("garbage", [True, False], ids=["garbage", "zeros"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_padded_or_future_positions(causal, seed, garbage):
    """Whatever the recipe: no row ever points at a padded query or key, and causal models never
    produce a key after its query."""
    lengths = [3, 1, 8, 12, 5, 12]
    maps, masks, m = random_batch(causal, seed=seed, layers=2, lengths=lengths, garbage=garbage)
    carry = None
    for i, probs in enumerate(maps):
        for name, cols in _all_outputs(LayerAttention(probs, i, masks), carry):
            if name == "carry":
                carry = cols
                continue
            c = ref.to_numpy(cols)
            n = np.array(lengths)[c["batch_index"]]
            if name == "head_stats":
                assert (c["window_tokens"] == n).all()
                assert all(np.isfinite(c[s]).all() for s in ref.STATS)
                continue
            assert (c["query_pos"] < n).all(), name
            if name == "dense":
                keys_per_row = c["weights.lengths"]
                limit = c["query_pos"] + 1 if causal else n
                assert (keys_per_row == limit).all(), name
                assert (c["weights.values"] >= 0).all()
                continue
            assert (c["key_pos"] < n).all(), name
            assert (c["key_pos"] >= 0).all() and (c["query_pos"] >= 0).all(), name
            if causal:
                assert (c["key_pos"] <= c["query_pos"]).all(), name


def _every_recipe_against_reference(maps, masks, m, tie, allow_maybe):
    """Run every recipe on `maps` (torch) and compare with the reference on the same values."""
    carry = None
    good = [p.double().numpy() for p in maps]
    rolled = ref.ref_rollout(good, m, k=3, tie=tie)
    for i, probs in enumerate(maps):
        att = LayerAttention(probs, i, masks)
        for per_head in (True, False):
            for name, fn, params in [("topk", ref.ref_topk, {"k": 3}),
                                     ("threshold", ref.ref_threshold, {"t": 0.1}),
                                     ("topp", ref.ref_topp, {"p": 0.7})]:
                expected = fn(good[i], m, **params, per_head=per_head, tie=tie)
                assert allow_maybe or expected.n_maybe == 0
                ref.assert_edges(run(name, att, **params, per_head=per_head), expected, EDGE_ATOL)
            ref.assert_dense(run("dense", att, max_tokens=64, per_head=per_head),
                             ref.ref_dense(good[i], m, max_tokens=64, per_head=per_head), EDGE_ATOL)
        ref.assert_head_stats(run("head_stats", att), ref.ref_head_stats(good[i], m), STAT_ATOL)
        cols, carry = run("rollout", att, carry, k=3)
        assert allow_maybe or rolled[i].n_maybe == 0
        ref.assert_edges(cols, rolled[i], EDGE_ATOL, with_head=False)


@CAUSAL
def test_nan_in_invalid_entries_is_ignored(causal):
    """NaN in padded rows/keys and future keys (as a fully masked softmax row can give) never
    reaches any output: results equal those on the clean maps."""
    maps, masks, m = random_batch(causal, seed=5, layers=2)
    valid = masks.pair_valid.expand_as(maps[0])
    nan_maps = [p.masked_fill(~valid, float("nan")) for p in maps]
    _every_recipe_against_reference(nan_maps, masks, m, tie=TIE, allow_maybe=False)
    # the reference only reads valid entries, so it is the same on the clean maps
    _every_recipe_against_reference(maps, masks, m, tie=TIE, allow_maybe=False)


@CAUSAL
def test_bfloat16_maps(causal):
    """Half-precision models hand over bfloat16 maps; recipes work on them in float32. bfloat16
    has 8 mantissa bits, so exact ties occur and are left to either side (tie = 0: exact only)."""
    maps, masks, m = random_batch(causal, seed=6, layers=2)
    low = [p.to(torch.bfloat16) for p in maps]
    carry = None
    for i, p in enumerate(low):
        cols, carry = run("rollout", LayerAttention(p, i, masks), carry, k=3)
        assert cols["weight"].dtype == torch.float32
    _every_recipe_against_reference(low, masks, m, tie=0.0, allow_maybe=True)
