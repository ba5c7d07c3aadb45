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
    captured, sites, padding = {}, [], []

    def sink(inputs):
        sites.append(inputs.site)
        padding.append(None if inputs._padding is None else inputs._padding[1])
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
    # The padded batch's mask went into the product as one more dimension (scores_rows), with
    # the future masked on causal models.
    assert set(padding) == {arch in ("gpt2", "llama")}


def test_masks_the_product_takes_and_the_ones_it_leaves():
    """LayerInputs.scores_rows folds a boolean mask into the product only when it is key padding
    (and causality); any other mask (a sliding window, padded queries, a float mask) is applied
    as it is. Every form gives softmax(q k^T * scaling + mask) and its entropies, also on a
    block of rows (float32 against float64, 1e-6), with grouped-query heads, on short and long rows."""
    torch.manual_seed(0)
    for size in (9, 60):  # the two ways to the entropy (short rows, long rows)
        _check_masks(size)


def _check_masks(size: int) -> None:
    from attnpipe.capture import LayerInputs
    from attnpipe.capture.sites import SiteKey

    batch, heads, kv, dim = 3, 4, 2, 8
    query, key = torch.randn(batch, heads, size, dim) * 2, torch.randn(batch, kv, size, dim)
    lengths = torch.tensor([size, size // 2, 2])
    seen = torch.arange(size)[None, :] < lengths[:, None]  # (batch, key)
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    window = causal & ~torch.ones(size, size, dtype=torch.bool).tril(-3)  # the last 3 keys only
    cases = {  # name -> (mask (batch, 1, q, k), folded into the product, causal)
        "padding": (seen[:, None, None, :].expand(batch, 1, size, size), True, False),
        "padding, materialised": (seen[:, None, None, :].expand(batch, 1, size, size).clone(), True, False),
        "padding and causal": ((seen[:, None, :] & causal)[:, None], True, True),
        "sliding window": ((seen[:, None, :] & window)[:, None], False, None),
        "padded queries too": ((seen[:, None, :] & seen[:, :, None])[:, None] | ~seen[:, None, :, None], False, None),
    }
    for name, (mask, folded, is_causal) in cases.items():
        inputs = LayerInputs(SiteKey("decoder", 0), query, key, 0.35, mask, None, heads // kv, bool(is_causal), None)
        assert (inputs._padding is not None) == folded, name
        if folded:
            assert inputs._padding[1] == is_causal, name
        keys = key.repeat_interleave(heads // kv, dim=1)
        low = torch.finfo(torch.float32).min
        want = torch.softmax((query.double() @ keys.double().transpose(-1, -2) * 0.35).masked_fill(~mask, low), -1)
        got, entropy = inputs.probs_entropy_rows(0, batch)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0, msg=name)
        want_entropy = -torch.special.xlogy(want, want).sum(-1)  # float64 throughout
        torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-6, rtol=0, msg=name)
        block = inputs.probs_rows(1, 3, 4, 7, 7 if is_causal else None)
        torch.testing.assert_close(block, torch.softmax(
            (query[1:3, :, 4:7] @ keys[1:3, :, :block.shape[-1]].transpose(-1, -2) * 0.35).masked_fill(
                ~mask[1:3, :, 4:7, :block.shape[-1]], low), -1), atol=1e-6, rtol=0, msg=name)


def test_outputs_from_the_recipes_probabilities_equal_eager(arch, tokenizer):
    """capture_layers(outputs=True), the CPU path: each layer's output is P V from the
    probabilities the sink formed (here a window at a time, and the last window in two blocks of
    queries), no SDPA; the model's last hidden state equals HF eager's (float32, 1e-5), with
    padding, causal masks, RoPE, GQA and T5's position bias. A sink that forms no probabilities,
    or only some rows, leaves the layer to SDPA: the same result."""
    from attnpipe.capture import capture_layers

    lm, reference = loaded(arch, tokenizer)
    _, ids, mask = _batch(tokenizer)
    eager_model = reference.get_encoder() if reference.config.is_encoder_decoder else reference
    eager_model.set_attn_implementation("eager")
    with torch.no_grad():
        want = eager_model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = mask.bool()
    for form in ("windows", "some rows", "none"):
        complete = []

        def sink(inputs):
            batch, size = inputs.query.shape[0], inputs.query.shape[2]
            if form == "windows":
                for w in range(batch - 1):
                    inputs.probs_rows(w, w + 1)
                half = size // 2
                inputs.probs_entropy_rows(batch - 1, batch, 0, half)
                inputs.probs_rows(batch - 1, batch, half, size)
            elif form == "some rows":
                inputs.probs_rows(0, 1)
            complete.append(inputs.output_complete)

        with capture_layers(sink, backend="sdpa", model=lm.model, causal=lm.causal, outputs=True), torch.no_grad():
            got = lm.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=1e-5, msg=form)
        assert complete == [form == "windows"] * lm.num_layers, form
