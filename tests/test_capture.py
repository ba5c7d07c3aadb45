"""Captured attention equals HF eager `output_attentions=True` (float32, within 1e-5), with
padding in the batch, on BERT, GPT-2 (causal), Llama (RoPE + GQA), T5 and BART encoders."""

from __future__ import annotations

import torch

from attnpipe.capture import capturing
from attnpipe.windows import collate, tokenize

from conftest import eager_attentions, loaded

TEXTS = ["The animal didn't cross the street because it was too tired.",
         "Short one.",
         "A somewhat longer sentence, with commas, numbers like 42, and a question at the end?"]
ATOL = 1e-5


def _batch(tokenizer):
    windows = tokenize(tokenizer, TEXTS, max_length=64, stride=8)
    return windows, *collate(windows, tokenizer.pad_token_id)


def test_capture_equals_eager(arch, tokenizer):
    lm, reference = loaded(arch, tokenizer)
    windows, ids, mask = _batch(tokenizer)
    assert (mask == 0).any(), "the batch must contain padding"
    captured = {}
    with capturing(lambda layer, probs: captured.__setitem__(layer, probs.clone())):
        lm.forward(ids, mask)
    expected = eager_attentions(reference, ids, mask)
    assert len(captured) == len(expected) == lm.num_layers
    for layer, ref in enumerate(expected):
        got = captured[layer]
        assert got.shape == ref.shape == (len(windows), lm.num_heads, ids.shape[1], ids.shape[1])
        valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
        torch.testing.assert_close(got[valid.expand_as(got)], ref[valid.expand_as(ref)], atol=ATOL, rtol=0)


def test_causal_detected(arch, tokenizer):
    lm, _ = loaded(arch, tokenizer)
    assert lm.causal == (arch in ("gpt2", "llama"))
    assert lm.num_heads == 4 and lm.num_layers == 2


def test_no_weights_returned_to_model(tokenizer):
    """The capture function hands no attention maps back, so nothing accumulates per layer."""
    lm, _ = loaded("bert", tokenizer)
    _, ids, mask = _batch(tokenizer)
    with torch.no_grad():
        out = lm.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is None or all(a is None for a in out.attentions)


def test_sdpa_backend_output_and_probs_equal_eager(arch, tokenizer):
    """The "sdpa" backend: the layer output comes from torch's scaled_dot_product_attention and
    the probabilities are recomputed from q, k, scaling and mask only when asked for; both equal
    HF eager (float32, 1e-5), with padding, causal masks, RoPE and GQA."""
    from attnpipe.capture import capture_layers

    lm, reference = loaded(arch, tokenizer)
    _, ids, mask = _batch(tokenizer)
    captured, sites = {}, []

    def sink(inputs):
        sites.append(inputs.site)
        assert inputs.given is None, "sdpa computes no probabilities by itself"
        captured[inputs.site.layer] = inputs.probs.clone()

    with capture_layers(sink, backend="sdpa", model=lm.model, causal=lm.causal), torch.no_grad():
        got_out = lm.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = eager_attentions(reference, ids, mask)
    valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    for layer, ref in enumerate(expected):
        torch.testing.assert_close(captured[layer][valid.expand_as(ref)], ref[valid.expand_as(ref)], atol=ATOL, rtol=0)
    eager_model = reference.get_encoder() if reference.config.is_encoder_decoder else reference
    eager_model.set_attn_implementation("eager")
    with torch.no_grad():
        want_out = eager_model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = mask.bool()
    torch.testing.assert_close(got_out[rows], want_out[rows], atol=1e-5, rtol=1e-5)
    assert [s.layer for s in sites] == list(range(lm.num_layers))
    assert {s.kind for s in sites} == {"self"}
    assert {s.stack for s in sites} == {"decoder" if arch in ("gpt2", "llama") else "encoder"}
