"""The README's architecture table, one row per test here: the per-head probabilities a batch
stores (`dense` through `reduce_batch`) equal HF eager `output_attentions=True` (float32, 1e-5)
on tiny RoBERTa, DistilBERT, Mistral (sliding window shorter than the text), Qwen2 (grouped-query
attention), Gemma (multi-query) and Gemma2 (attention logit soft-capping and a sliding window),
with padding in the batch, for each backend: eager, sdpa, and fused on the kernels' torch
reference. There `topk` with k = every key comes from the kernels, so it is compared too; on
Gemma2 it must not: the kernels form scores without the soft-cap, so its layers (run on the
model's eager attention whatever the backend) go to the torch recipes.

BERT, GPT-2, Llama (GQA), T5 and BART are covered by tests/test_capture.py and
tests/test_backends.py over conftest's TINY_CONFIGS (encoder self-attention), T5, BART and Marian
on all three sites by tests/test_seq2seq.py; they are not repeated here. These configs stay out
of conftest's TINY_CONFIGS, which many tests parametrize over.
"""

from __future__ import annotations


import pytest
import torch
from transformers import (AutoModel, DistilBertConfig, Gemma2Config, GemmaConfig, MistralConfig,
                          Qwen2Config, RobertaConfig)

from attnpipe import kernels
from attnpipe.model import LoadedModel
from attnpipe.recipes import validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.windows import collate, tokenize

from conftest import VOCAB, eager_attentions

ATOL = 1e-5
# Two texts of different lengths: the short one is padded. The long one (16 tokens) is longer
# than WINDOW, so a sliding window hides keys from its later queries.
TEXTS = ["The animal didn't cross the street because it was too tired.", "Short one."]
WINDOW = 4
SOFTCAP = 1.0  # small, so the tanh cap changes these tiny models' scores (checked below)
# Queries scaled so the tiny models' maps are far from uniform (and the soft-cap bites).
SHARPEN = 30.0
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, pad_token_id=0)

CONFIGS = {
    # position ids count from pad_token_id + 1, so the table holds 128 + 2 positions
    "roberta": lambda: RobertaConfig(**{**SIZES, "max_position_embeddings": 130}),
    "distilbert": lambda: DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                           max_position_embeddings=128, pad_token_id=0),
    # causal, GQA (4 query heads on 2 key/value heads), every layer a sliding window of WINDOW keys
    "mistral": lambda: MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=WINDOW),
    # causal, GQA, bias on q/k/v
    "qwen2": lambda: Qwen2Config(**SIZES, num_key_value_heads=2),
    # causal, multi-query (one key/value head), heads of 16 dims: 4 x 16 is not the hidden size
    "gemma": lambda: GemmaConfig(**SIZES, num_key_value_heads=1, head_dim=16),
    # causal, GQA, tanh soft-capping of the scores; layer 0 a sliding window, layer 1 full;
    # scaling 1/sqrt(query_pre_attn_scalar), not 1/sqrt(head_dim)
    "gemma2": lambda: Gemma2Config(**SIZES, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16,
                                   attn_logit_softcapping=SOFTCAP, final_logit_softcapping=None,
                                   sliding_window=WINDOW),
}
CAUSAL = {"mistral", "qwen2", "gemma", "gemma2"}
BACKENDS = ["eager", "sdpa", "fused"]
RECIPES = [validate_recipe({"name": "dense", "max_tokens": 64, "per_head": True}, "test"),
           validate_recipe({"name": "topk", "k": 64, "per_head": True}, "test")]
DENSE, TOPK = 0, 1


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModel.from_config(CONFIGS[arch](), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "query.weight", "q_lin.weight")):
                p.mul_(SHARPEN)
    return model


@pytest.fixture(scope="module")
def batch(tokenizer):
    windows = tokenize(tokenizer, TEXTS, max_length=64, stride=8)
    ids, mask = collate(windows, tokenizer.pad_token_id)
    assert len(windows) == 2 and (mask == 0).any(), "two windows, one padded"
    assert mask.sum(1).max() > 2 * WINDOW
    return windows, ids, mask


@pytest.fixture(scope="module")
def expected(batch):
    """arch -> the eager reference's (batch, head, q, k) map per layer, computed once per module."""
    _, ids, mask = batch
    return {arch: eager_attentions(tiny(arch), ids, mask) for arch in CONFIGS}


def stored_maps(outputs, recipe: int, shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """layer -> (batch, head, q, k) rebuilt from one recipe's rows: dense (keys 0..n-1 of each row)
    or edges (key_pos, weight); zero wherever no row says otherwise."""
    maps = {}
    for out in outputs:
        if out.recipe != recipe:
            continue
        assert (out.stack, out.attention) in {("encoder", "self"), ("decoder", "self")}
        m = maps.setdefault(out.layer, torch.zeros(shape))
        c = {k: torch.from_numpy(v) for k, v in out.columns.items()}
        if recipe == DENSE:
            starts = torch.cat([torch.zeros(1, dtype=torch.long), c["weights.lengths"].long().cumsum(0)])
            for i, (b, h, q) in enumerate(zip(c["batch_index"], c["head"], c["query_pos"])):
                m[b, h, q, : c["weights.lengths"][i]] = c["weights.values"][starts[i]:starts[i + 1]]
        else:
            m[c["batch_index"], c["head"], c["query_pos"], c["key_pos"]] = c["weight"]
    return maps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_stored_probabilities_equal_eager(arch, backend, tokenizer, batch, expected, monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)  # fused: the kernels' torch reference
    windows, ids, mask = batch
    lm = LoadedModel(tiny(arch), tokenizer, f"tiny-{arch}", torch.device("cpu"), backend=backend)
    assert lm.causal == (arch in CAUSAL) and (lm.num_layers, lm.num_heads) == (2, 4)
    outputs = reduce_batch(lm, windows, RECIPES)
    want = expected[arch]
    shape = want[0].shape
    assert shape == (2, 4, ids.shape[1], ids.shape[1])
    valid = (mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]).expand(shape)
    # fused: dense comes from P formed from q and k, topk from the kernels; the others: both from P
    for recipe in (DENSE, TOPK):
        got = stored_maps(outputs, recipe, shape)
        assert sorted(got) == [0, 1]
        for layer, ref in enumerate(want):
            torch.testing.assert_close(got[layer][valid], ref[valid], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{arch}/{backend} recipe {recipe} layer {layer}: {m}")


def _far_pairs(mask: torch.Tensor) -> torch.Tensor:
    """(batch, 1, q, k) real query/key pairs at least WINDOW positions apart, key before query."""
    n = mask.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    return valid & (q - k >= WINDOW)


@pytest.mark.parametrize("arch,layers", [("mistral", [0, 1]), ("gemma2", [0])])
def test_the_sliding_window_matters(arch, layers, batch, expected):
    """The reference hides keys WINDOW or more positions back on sliding layers (so the test above
    checks the window), and Gemma2's full layer does not."""
    _, _, mask = batch
    far = _far_pairs(mask).expand_as(expected[arch][0])
    assert far.any()
    for layer, ref in enumerate(expected[arch]):
        hidden = bool((ref[far] == 0).all())
        assert hidden == (layer in layers), f"{arch} layer {layer}"


def test_the_soft_cap_matters(batch, expected):
    """Without soft-capping Gemma2's maps differ well beyond the tolerance: the equality above
    checks that the cap is applied (today by running the layer's eager attention, whatever the
    backend, because SDPA has no soft-cap)."""
    _, ids, mask = batch
    model = tiny("gemma2")
    model.config.attn_logit_softcapping = None
    for layer in model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = eager_attentions(model, ids, mask)
    valid = (mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]).expand_as(uncapped[0])
    for layer, ref in enumerate(expected["gemma2"]):
        assert (uncapped[layer][valid] - ref[valid]).abs().max() > 100 * ATOL
