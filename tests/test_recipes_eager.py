"""reduce_batch() end to end on tiny models: every recipe's output for every layer equals the
plain float64 reference (tests/reference.py) applied to HF eager `output_attentions=True` maps,
on a right-padded batch, for BERT, GPT-2 (causal) and Llama (causal, RoPE + GQA).

The masks the references use are computed here, independently of pipeline.reduce.batch_masks.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from attnpipe.recipes import recipe_id, validate_recipe
from attnpipe.reduce import batch_masks, reduce_batch
from attnpipe.windows import collate, tokenize

import reference as ref
from conftest import eager_attentions, loaded

# float32 model maps against a float64 reference on the same eager maps.
ATOL = 1e-5
# Selections (top-k, threshold, top-p) may go either way for values within ATOL of a decision
# boundary; such entries are few (checked by MAX_MAYBE_FRACTION) and are not compared.
TIE = ATOL
MAX_MAYBE_FRACTION = 0.02

TEXTS = ["The animal didn't cross the street because it was too tired, and then it slept for a "
         "long time; nobody knew why, or whether it would ever wake up again.",
         "Hi.",
         "A somewhat longer sentence, with commas, numbers like 42, and a question?",
         "x"]
MAX_LENGTH, STRIDE = 24, 4  # the first text overflows into full-length windows

SPECS = [validate_recipe(s, "test") for s in [
    {"name": "head_stats"},
    {"name": "topk", "k": 3, "per_head": True},
    {"name": "topk", "k": 2, "per_head": False},
    {"name": "topk", "k": 100},  # more than any window
    {"name": "threshold", "t": 0.1, "per_head": True},
    {"name": "threshold", "t": 0.05, "per_head": False},
    {"name": "threshold", "t": 0.0},
    {"name": "topp", "p": 0.5, "per_head": True},
    {"name": "topp", "p": 0.9, "per_head": False},
    {"name": "topp", "p": 1.0},
    {"name": "rollout", "k": 4},
    {"name": "rollout", "k": 100},
    {"name": "dense", "max_tokens": 19, "per_head": True},  # 19: exactly one window's length
    {"name": "dense", "per_head": False},
]]
CAUSAL_ARCHS = {"gpt2", "llama"}
SHARPEN = 30.0  # scale query projections so the tiny models' maps are far from uniform


def sharpen(model: torch.nn.Module, arch: str) -> None:
    """Multiply the query projection by SHARPEN (same change on both copies of the weights)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if arch == "bert" and ".attention.self.query." in name:
                p.mul_(SHARPEN)
            elif arch == "llama" and name.endswith("q_proj.weight"):
                p.mul_(SHARPEN)
            elif arch == "gpt2" and ".attn.c_attn." in name:  # Conv1D: columns [q | k | v]
                width = model.config.n_embd
                p[..., :width].mul_(SHARPEN)


class Case:
    def __init__(self, arch: str, tokenizer):
        self.arch = arch
        lm, reference = loaded(arch, tokenizer)
        sharpen(lm.model, arch)
        sharpen(reference, arch)
        self.lm = lm
        self.windows = tokenize(tokenizer, TEXTS, max_length=MAX_LENGTH, stride=STRIDE)
        ids, mask = collate(self.windows, lm.pad_id)
        self.ids, self.mask = ids, mask
        self.outputs = reduce_batch(lm, self.windows, SPECS)
        self.maps = [a.double().numpy() for a in eager_attentions(reference, ids, mask)]
        # Masks, computed here from the windows and token ids.
        batch, size = ids.shape
        lengths = np.array([len(w) for w in self.windows])
        valid = np.arange(size)[None, :] < lengths[:, None]
        special = np.zeros((batch, size), dtype=bool)
        for row, w in enumerate(self.windows):
            special[row, : len(w)] = w.special
        sep = np.isin(ids.numpy(), sorted(lm.sep_ids)) & valid
        punct = lm.punct_table.numpy()[ids.numpy()] & valid
        self.m = ref.Masks(lengths, special, sep, punct, arch in CAUSAL_ARCHS)

    def columns(self, recipe: int) -> list[dict]:
        """The recipe's columns, one dict per layer, in layer order."""
        by_layer = {o.layer: o.columns for o in self.outputs if o.recipe == recipe}
        assert sorted(by_layer) == list(range(self.lm.num_layers))
        return [by_layer[layer] for layer in range(self.lm.num_layers)]


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def case(request, tokenizer):
    return Case(request.param, tokenizer)


def test_batch_is_padded_and_varied(case):
    lengths = case.m.lengths
    assert (case.mask == 0).any(), "the batch must contain padding"
    assert lengths.max() == MAX_LENGTH and lengths.min() <= 4 and len(set(lengths)) >= 3
    assert 19 in lengths and 20 in lengths  # the dense max_tokens=19 boundary: in and out
    assert case.m.sep.any() and case.m.punct.any() and case.m.special.any()
    assert case.lm.causal == case.m.causal
    assert len(case.maps) == case.lm.num_layers


def test_one_output_per_recipe_and_layer(case):
    counts = Counter((o.recipe, o.layer) for o in case.outputs)
    assert counts == Counter({(i, layer): 1 for i in range(len(SPECS))
                              for layer in range(case.lm.num_layers)})


def test_masks_agree_with_pipeline(case):
    """Not a recipe check, but tells a mask bug apart from a recipe bug."""
    got = batch_masks(case.lm, case.windows, case.ids)
    np.testing.assert_array_equal(got.lengths.numpy(), case.m.lengths)
    np.testing.assert_array_equal(got.special.numpy(), case.m.special)
    np.testing.assert_array_equal(got.sep.numpy(), case.m.sep)
    np.testing.assert_array_equal(got.punct.numpy(), case.m.punct)
    assert got.causal == case.m.causal


def _check_selection(expected: ref.EdgeRef, cols: dict, with_head: bool = True) -> None:
    assert expected.n_maybe <= MAX_MAYBE_FRACTION * max(1, len(expected.status))
    ref.assert_edges(cols, expected, ATOL, with_head=with_head)


@pytest.mark.parametrize("i", range(len(SPECS)), ids=[recipe_id(s) for s in SPECS])
def test_recipe_equals_reference_on_eager_maps(case, i):
    spec = SPECS[i]
    name = spec["name"]
    params = {k: v for k, v in spec.items() if k != "name"}
    per_layer = case.columns(i)
    m = case.m
    if name == "rollout":
        expected = ref.ref_rollout(case.maps, m, k=params["k"], tie=TIE)
        for cols, want in zip(per_layer, expected):
            _check_selection(want, cols, with_head=False)
        return
    for cols, probs in zip(per_layer, case.maps):
        if name == "head_stats":
            ref.assert_head_stats(cols, ref.ref_head_stats(probs, m), ATOL)
        elif name == "topk":
            _check_selection(ref.ref_topk(probs, m, **params, tie=TIE), cols)
        elif name == "threshold":
            _check_selection(ref.ref_threshold(probs, m, **params, tie=TIE), cols)
        elif name == "topp":
            _check_selection(ref.ref_topp(probs, m, **params, tie=TIE), cols)
        elif name == "dense":
            expected = ref.ref_dense(probs, m, **params)
            assert expected, "max_tokens should keep some windows"
            ref.assert_dense(cols, expected, ATOL)
        else:
            pytest.fail(f"no reference for recipe {name!r}")


def test_no_padded_or_future_positions(case):
    lengths = case.m.lengths
    for o in case.outputs:
        c = o.columns
        what = f"{recipe_id(SPECS[o.recipe])} layer {o.layer}"
        n = lengths[c["batch_index"]]
        if "window_tokens" in c:
            assert (c["window_tokens"] == n).all(), what
            continue
        assert (c["query_pos"] < n).all(), what
        if "weights.lengths" in c:
            limit = c["query_pos"] + 1 if case.m.causal else n
            assert (c["weights.lengths"] == limit).all(), what
            continue
        assert (c["key_pos"] < n).all(), what
        if case.m.causal:
            assert (c["key_pos"] <= c["query_pos"]).all(), what
