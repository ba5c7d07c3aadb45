"""Interventions equal a plain masked eager forward.

The reference is HF's own eager attention (each architecture's `eager_attention_forward`) run
through a separate attention function, "ref_edit", that adds a hand-built bias to the additive
mask, or replaces chosen heads' probabilities by recorded ones, with nothing from
pipeline/control in its path. Compared: every layer's probabilities (output_attentions) and the
final hidden states on real tokens, float32, atol 1e-5 (rtol 1e-5 for hidden states), for BERT,
GPT-2 (causal) and Llama (RoPE, grouped-query), a padded batch, the eager and sdpa backends.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attnpipe.capture import capture_layers, editing
from attnpipe.capture.sites import module_names, site_key
from attnpipe.control.edits import Edit
from attnpipe.control.effects import Outputs, measure
from attnpipe.control.keys import WindowDocs, key_mask
from attnpipe.errors import JobError
from attnpipe.job import InterventionSpec, KeysSpec, build_job
from attnpipe.reduce import batch_masks
from attnpipe.windows import collate, tokenize

from conftest import error_line, invoke, loaded, raises_one_line, write_job

ARCHS = ["bert", "gpt2", "llama"]
TEXTS = ["The animal didn't cross the street because it was too tired.", "Short one.",
         "A somewhat longer sentence, with commas, numbers like 42, and a question at the end?"]
ATOL = 1e-5
REF = "ref_edit"
_EDITS: dict = {}  # what the reference applies: "bias" -> {layer: (batch, head, q, k)}, "patch" -> ...


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """HF eager attention with the test's edit: mask + bias, or patched probabilities x values."""
    layer = site_key(module, _EDITS["names"]).layer
    eager = sys.modules[type(module).__module__].eager_attention_forward
    bias = _EDITS.get("bias", {}).get(layer)
    if bias is not None:
        attention_mask = bias if attention_mask is None else attention_mask[..., : key.shape[2]] + bias
    output, probs = eager(module, query, key, value, attention_mask, **kwargs)
    patch = _EDITS.get("patch", {}).get(layer)
    if patch is not None:
        recorded, where = patch  # (batch, head, q, k), (batch, head)
        probs = torch.where(where[:, :, None, None], recorded, _EDITS["own"][layer])
        n_rep = query.shape[1] // value.shape[1]
        v = value.repeat_interleave(n_rep, dim=1)
        output = (probs @ v).transpose(1, 2).contiguous()
    return output, probs


AttentionInterface.register(REF, _reference_attention)
AttentionMaskInterface.register(REF, eager_mask)


def _batch(tokenizer):
    windows = tokenize(tokenizer, TEXTS, max_length=64, stride=8)
    ids, mask = collate(windows, tokenizer.pad_token_id)
    assert (mask == 0).any(), "the batch must contain padding"
    return windows, ids, mask


def _reference(model: torch.nn.Module, ids, mask, edits: dict):
    """(hidden states, attentions) of the untouched model through "ref_edit" with `edits`."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(REF)
    _EDITS.clear()
    _EDITS.update(edits, names=module_names(ref))
    try:
        with torch.no_grad():
            out = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        _EDITS.clear()
    return out.last_hidden_state, list(out.attentions)


def _edited(lm, ids, mask, edit, backend: str):
    """(hidden states, probabilities per layer) of the pipeline with `edit` at the seam."""
    seen = {}
    with capture_layers(lambda i: seen.__setitem__(i.site.layer, i.probs.clone()), backend=backend,
                        model=lm.model, causal=lm.causal), editing(edit, model=lm.model, causal=lm.causal):
        out = lm.forward(ids, mask)
    return out.last_hidden_state, seen


def _compare(got, want, mask):
    (got_h, got_p), (want_h, want_p) = got, want
    rows = mask.bool()
    torch.testing.assert_close(got_h[rows], want_h[rows], atol=ATOL, rtol=1e-5)
    valid = (rows[:, None, :, None] & rows[:, None, None, :])
    for layer, ref in enumerate(want_p):
        v = valid.expand_as(ref)
        torch.testing.assert_close(got_p[layer][v], ref[v], atol=ATOL, rtol=0)


def _spec(**kw) -> InterventionSpec:
    return InterventionSpec.model_validate(kw)


OPS = [("scale", {"alpha": 0.01}, math.log(0.01)), ("zero", {}, -math.inf), ("bias", {"value": 2.5}, 2.5)]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("op,params,added", OPS, ids=[o[0] for o in OPS])
@pytest.mark.parametrize("arch", ARCHS)
def test_pre_softmax_ops_equal_masked_eager(arch, op, params, added, backend, tokenizer):
    """keys = positions 1 and 3 in heads 0 and 2 of layer 1: the reference adds `added` to
    exactly those scores; the other layer and heads are untouched."""
    lm, reference = loaded(arch, tokenizer)
    windows, ids, mask = _batch(tokenizer)
    chosen = torch.zeros(ids.shape, dtype=torch.bool)
    chosen[:, [1, 3]] = True
    chosen &= mask.bool()
    spec = _spec(op=op, layers=[1], heads=[0, 2], keys={"positions": [1, 3]}, **params)
    bias = torch.zeros(len(windows), 4, ids.shape[1], ids.shape[1])
    bias[:, [0, 2]] = torch.where(chosen[:, None, :], added, 0.0).expand(-1, ids.shape[1], -1)[:, None]
    want = _reference(reference, ids, mask, {"bias": {1: bias}})
    got = _edited(lm, ids, mask, Edit(spec, 4, selected=chosen), backend)
    _compare(got, want, mask)
    if op == "zero":  # removed keys get exactly nothing
        assert float(got[1][1][:, [0, 2]][chosen[:, None, None, :].expand(-1, 2, ids.shape[1], -1)].max()) == 0.0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_except_keys_scale_is_pasta(arch, backend, tokenizer):
    """PASTA: every real key but the emphasised ones gets log(alpha), in all layers' head 1."""
    from attnpipe.control.run import build_edit

    lm, reference = loaded(arch, tokenizer)
    windows, ids, mask = _batch(tokenizer)
    spec = _spec(op="scale", heads=[1], except_keys={"positions": [2]})
    rt = type("Rt", (), {"model": lm})()
    edit, keys, _ = build_edit(rt, spec, windows, WindowDocs(["a", "b", "c"], TEXTS, {}),
                               batch_masks(lm, windows, ids), ids, mask)
    assert keys == [len(w) - 1 for w in windows]
    others = mask.bool().clone()
    others[:, 2] = False
    bias = torch.zeros(len(windows), 4, ids.shape[1], ids.shape[1])
    bias[:, 1] = torch.where(others[:, None, :], math.log(0.01), 0.0)
    want = _reference(reference, ids, mask, {"bias": {0: bias, 1: bias}})
    _compare(_edited(lm, ids, mask, edit, backend), want, mask)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_equals_eager_with_recorded_pattern(arch, backend, tokenizer):
    """Head 3 of layer 0 takes the pattern the same head computed on other inputs (recorded by
    HF eager output_attentions), in windows 0 and 2 only; window 1 keeps its own."""
    lm, reference = loaded(arch, tokenizer)
    windows, ids, mask = _batch(tokenizer)
    donor_ids = ids.clone()
    donor_ids[mask.bool()] = (ids[mask.bool()] * 7 + 11) % 30000 + 100  # other tokens, same lengths
    _, donor = _reference(reference, donor_ids, mask, {})
    _, own = _reference(reference, ids, mask, {})
    rows = torch.tensor([True, False, True])
    where = rows[:, None] & (torch.arange(4) == 3)[None, :]
    spec = _spec(op="patch", layers=[0], heads=[3], patch_from="pair")
    edit = Edit(spec, 4, donor={0: donor[0]}, patch_rows=rows)
    want = _reference(reference, ids, mask, {"patch": {0: (donor[0], where)}, "own": {0: own[0]}})
    got = _edited(lm, ids, mask, edit, backend)
    _compare(got, want, mask)
    torch.testing.assert_close(got[1][0][0, 3], donor[0][0, 3], atol=ATOL, rtol=0)


def test_zero_never_leaves_a_query_without_keys(tokenizer):
    """Causal: query 0 sees only key 0. Removing key 0 would leave it nothing, so that row keeps
    its unedited attention (1 on key 0); every later row loses key 0."""
    lm, _ = loaded("gpt2", tokenizer)
    _, ids, mask = _batch(tokenizer)
    chosen = torch.zeros(ids.shape, dtype=torch.bool)
    chosen[:, 0] = True
    _, probs = _edited(lm, ids, mask, Edit(_spec(op="zero", keys={"positions": [0]}), 4, selected=chosen), "eager")
    assert torch.isfinite(probs[0]).all()
    assert torch.equal(probs[0][:, :, 0, 0], torch.ones(3, 4))
    assert float(probs[0][:, :, 1:, 0].max()) == 0.0


def test_keys_from_spans_regex_column_segment(tokenizer):
    """A token is selected when its characters overlap a span; segments are the token flags."""
    lm, _ = loaded("bert", tokenizer)
    windows, ids, _ = _batch(tokenizer)
    masks = batch_masks(lm, windows, ids)
    docs = WindowDocs(["a", "b", "c"], TEXTS, {"span": [[4, 10], None, [[2, 10], [11, 15]]]})
    tokens = [tokenizer.convert_ids_to_tokens(w.input_ids) for w in windows]

    def picked(**keys):
        sel = key_mask(KeysSpec(**keys), windows, docs, masks)
        return [[t for t, s in zip(toks, row.tolist()) if s] for toks, row in zip(tokens, sel)]

    assert picked(spans=[[4, 10]]) == [["animal"], ["short", "one", "."], ["somewhat"]]
    assert picked(regex=r"\bthe\b") == [["the"], [], ["the"]]
    assert picked(column="span") == [["animal"], [], ["somewhat", "longer"]]
    assert picked(segment="special") == [["[CLS]", "[SEP]"]] * 3
    assert picked(positions=[0, 40])[1] == ["[CLS]"]  # positions past a window's end select nothing


def test_measures_by_hand():
    """cosine, KL(P||Q) mean over real tokens and at the last, logit difference: hand numbers."""
    mask = torch.tensor([[1, 1, 0]])
    hid_p = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    hid_q = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    lp = torch.log_softmax(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [3.0, 3.0]]]), -1)
    lq = torch.log_softmax(torch.tensor([[[0.0, 0.0], [0.0, 1.0], [0.0, 3.0]]]), -1)
    p = Outputs(pooled=torch.tensor([[0.5, 0.5]]), logprobs=lp, last_logits=torch.tensor([[1.0, 0.0]]))
    q = Outputs(pooled=torch.tensor([[1.0, 0.0]]), logprobs=lq, last_logits=torch.tensor([[0.0, 1.0]]))
    from attnpipe.control.effects import mean_pool

    torch.testing.assert_close(mean_pool(hid_p, mask), p.pooled)
    torch.testing.assert_close(mean_pool(hid_q, mask), q.pooled)
    got = measure(p, q, mask, [0, 1])
    assert got["cosine"].item() == pytest.approx(1 / math.sqrt(2))
    a, b = math.exp(1) / (1 + math.exp(1)), 1 / (1 + math.exp(1))  # P at position 1; Q = (b, a)
    kl1 = a * math.log(a / b) + b * math.log(b / a)
    assert got["kl_last"].item() == pytest.approx(kl1, rel=1e-5)
    assert got["kl_mean"].item() == pytest.approx(kl1 / 2, rel=1e-5)  # position 0: P = Q
    assert (got["logit_diff"].item(), got["logit_diff_clean"].item()) == (-1.0, 1.0)


def _corpus(tmp_path, rows):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_job_effects_equal_hand_computation(tmp_path, tiny_model_dir, tokenizer):
    """A job's effects rows: the cosine of mean-pooled final hidden states with and without the
    intervention, each computed here by the reference; a pair of another length gets a note."""
    rows = [{"id": "d1", "text": "The nurse said that she was tired.", "pair": "The nurse said that he was tired.",
             "span": [4, 9]},
            {"id": "d2", "text": "A doctor came.", "pair": "A much longer paired text here.", "span": [2, 8]}]
    interventions = ('[[interventions]]\nop = "zero"\nlayers = [1]\nheads = [0, 2]\nkeys = { column = "span" }\n'
                     '[[interventions]]\nlabel = "swap"\nop = "patch"\nlayers = [0]\nheads = [1]\npatch_from = "pair"\n')
    job = write_job(tmp_path, _corpus(tmp_path, rows), tiny_model_dir("bert"), attention="sdpa",
                    extra='id_column = "id"\nmetadata_columns = ["pair", "span"]',
                    recipes='[[recipes]]\nname = "head_stats"\n' + interventions)
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    table = pq.read_table(next((tmp_path / "out").glob("effects/*.parquet"))).to_pylist()
    assert [(r["doc_id"], r["label"]) for r in table] == [("d1", "i0:zero"), ("d1", "swap"),
                                                          ("d2", "i0:zero"), ("d2", "swap")]
    assert table[3]["cosine"] is None and "tokens" in table[3]["note"]
    lm, reference = loaded("bert", tokenizer)
    windows = tokenize(tokenizer, [rows[0]["text"]], 64, 8)
    ids, mask = collate(windows, tokenizer.pad_token_id)
    chosen = torch.tensor([[b > a and a < 9 and b > 4 for a, b in windows[0].offsets]])
    bias = torch.zeros(1, 4, ids.shape[1], ids.shape[1])
    bias[:, [0, 2]] = torch.where(chosen[:, None, :], -math.inf, 0.0)[:, None]
    clean, _ = _reference(reference, ids, mask, {})
    zeroed, _ = _reference(reference, ids, mask, {"bias": {1: bias}})
    want = torch.nn.functional.cosine_similarity(clean.mean(1), zeroed.mean(1)).item()
    assert table[0]["keys"] == int(chosen.sum()) == 1
    assert table[0]["cosine"] == pytest.approx(want, abs=1e-6)
    pair = tokenize(tokenizer, [rows[0]["pair"]], 64, 8)
    pair_ids, _ = collate(pair, tokenizer.pad_token_id)
    _, donor = _reference(reference, pair_ids, mask, {})
    _, own = _reference(reference, ids, mask, {})
    where = torch.tensor([[False, True, False, False]])
    patched, _ = _reference(reference, ids, mask, {"patch": {0: (donor[0], where)}, "own": {0: own[0]}})
    want = torch.nn.functional.cosine_similarity(clean.mean(1), patched.mean(1)).item()
    assert table[1]["cosine"] == pytest.approx(want, abs=1e-6) and table[1]["keys"] == ids.shape[1]


def test_kl_and_logit_diff_on_a_language_model(tmp_path, tiny_model_dir):
    """effects.logits on GPT-2 (tied head): KL >= 0, zero where no key was selected; targets."""
    rows = [{"id": "d1", "text": "The nurse said that"}, {"id": "d2", "text": "Nothing to find"}]
    job = write_job(tmp_path, _corpus(tmp_path, rows), tiny_model_dir("gpt2"),
                    extra='id_column = "id"',
                    recipes='[[recipes]]\nname = "head_stats"\n[[interventions]]\nop = "zero"\n'
                            'keys = { regex = "nurse" }\n[effects]\nlogits = true\ntargets = ["he", "she"]\n')
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    table = pq.read_table(next((tmp_path / "out").glob("effects/*.parquet"))).to_pylist()
    moved, still = table
    assert moved["kl_mean"] > 0 and moved["kl_last"] > 0 and moved["logit_diff"] != moved["logit_diff_clean"]
    assert still["note"] == "no key selected" and still["kl_last"] == pytest.approx(0, abs=1e-6)
    assert still["cosine"] == pytest.approx(1, abs=1e-6)


BAD = [
    ({"op": "zero"}, "exactly one of keys"),
    ({"op": "zero", "keys": {"positions": [1]}, "except_keys": {"positions": [2]}}, "exactly one of keys"),
    ({"op": "zero", "keys": {}}, "must set exactly one of positions"),
    ({"op": "zero", "keys": {"regex": "("}}, "is not a regular expression"),
    ({"op": "zero", "keys": {"regex": "x*"}}, "matches the empty string"),
    ({"op": "zero", "keys": {"segment": "context"}}, "is a prompt segment of generate runs"),
    ({"op": "zero", "keys": {"column": "nope"}}, "not in corpus.metadata_columns"),
    ({"op": "zero", "keys": {"spans": [[5, 2]]}}, "is not a character span"),
    ({"op": "bias", "keys": {"positions": [1]}}, "'interventions[0].value' is missing"),
    ({"op": "patch"}, "needs patch_from"),
    ({"op": "patch", "patch_from": "x", "keys": {"positions": [1]}}, "remove keys/except_keys"),
    ({"op": "zero", "heads": [], "keys": {"positions": [1]}}, "interventions[0].heads"),
    ({"op": "drop", "keys": {"positions": [1]}}, "'interventions[0].op'"),
    ({"op": "zero", "keys": {"positions": [1]}, "alpha": -1}, "'interventions[0].alpha'"),
    ({"op": "zero", "keys": {"positions": [1]}, "typo": 1}, "unknown key 'interventions[0].typo'; valid keys"),
    ({"op": "zero", "keys": {"position": [1]}}, "unknown key 'interventions[0].keys.position'; valid keys here: "
                                                 "positions"),
]


@pytest.mark.parametrize("spec,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_specs_give_one_line(spec, expected):
    data = {"corpus": {"path": "x.jsonl"}, "interventions": [spec]}
    assert expected in raises_one_line(JobError, build_job, data)


def test_bad_model_numbers_give_one_line(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, _corpus(tmp_path, [{"text": "a b"}]), tiny_model_dir("bert"),
                    recipes='[[recipes]]\nname = "head_stats"\n[[interventions]]\nop = "zero"\nheads = [4]\n'
                            'keys = { positions = [1] }\n')
    result = invoke("run", job)
    assert result.exit_code == 1 and "interventions[0].heads: 4 is out of range; the model has 4 heads" \
        in result.output, result.output


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_unpadded_batch_without_a_mask(backend, tokenizer):
    """BERT without padding gets no mask from transformers; the bias alone is the mask then."""
    lm, reference = loaded("bert", tokenizer)
    windows = tokenize(tokenizer, [TEXTS[0]], max_length=64, stride=8)
    ids, mask = collate(windows, tokenizer.pad_token_id)
    chosen = torch.zeros(ids.shape, dtype=torch.bool)
    chosen[:, 2:5] = True
    bias = torch.zeros(1, 4, ids.shape[1], ids.shape[1])
    bias[:, 1] = torch.where(chosen[:, None, :], -math.inf, 0.0)
    want = _reference(reference, ids, mask, {"bias": {0: bias}})
    got = _edited(lm, ids, mask, Edit(_spec(op="zero", layers=[0], heads=[1], keys={"positions": [2, 3, 4]}), 4,
                                      selected=chosen), backend)
    _compare(got, want, mask)


def test_missing_mask_of_a_causal_module_stays_causal():
    """A causal module handed no mask: the bias is added to the causal triangle, not to zeros."""
    from attnpipe.capture import biased_mask

    module = torch.nn.Module()
    module.is_causal = True
    query, key = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    bias = torch.zeros(1, 2, 3, 3)
    bias[:, 0, :, 0] = 1.5
    got = biased_mask(None, bias, query, key, module)
    low = torch.finfo(torch.float32).min
    want = torch.tensor([[0.0, low, low], [0.0, 0.0, low], [0.0, 0.0, 0.0]]).expand(1, 2, 3, 3).clone()
    want[:, 0, :, 0] += 1.5
    torch.testing.assert_close(got, want)


def _reference_generate_attention(module, query, key, value, attention_mask, **kwargs):
    """HF eager attention plus the test's prompt-key bias, padded to the growing keys."""
    selected, value_added, heads = _EDITS["generate"]
    k = key.shape[2]
    sel = torch.zeros(selected.shape[0], k, dtype=torch.bool)
    sel[:, : min(k, selected.shape[1])] = selected[:, :k]
    bias = torch.where(sel[:, None, None, :] & heads[None, :, None, None], value_added, 0.0)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask[..., :k] + bias, **kwargs)


AttentionInterface.register("ref_generate", _reference_generate_attention)
AttentionMaskInterface.register("ref_generate", eager_mask)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_an_intervention_equals_hf_generate(arch, tmp_path, tokenizer):
    """A generate run with [[interventions]]: the text generated with the edit equals HF
    generate (greedy, KV cache, the same left-padded batch) through an attention function that
    adds log(alpha) to the selected prompt keys in heads 1 and 3 of every layer; a selection that
    finds nothing reproduces documents.generated_text."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from attnpipe.generate.decode import decoded
    from attnpipe.read import open_dataset

    configs = {"gpt2": GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=None, eos_token_id=None),
               "llama": LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=None, eos_token_id=None)}
    torch.manual_seed(1)
    model_dir = tmp_path / "lm"
    AutoModelForCausalLM.from_config(configs[arch]).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"id": "a", "text": "The old mill stands by the river."}, {"id": "b", "text": "Nobody came."},
            {"id": "c", "text": "The fisherman painted his boat blue last spring, after the storm."}]
    corpus = _corpus(tmp_path, rows)
    job = tmp_path / "gen.toml"
    job.write_text(f'name = "gen"\n[corpus]\npath = "{corpus}"\nid_column = "id"\n[model]\nname = "{model_dir}"\n'
                   f'[run]\noutput = "{tmp_path / "out"}"\nprogress = false\n'
                   '[generate]\nmax_new_tokens = 6\nbatch_size = 3\nchat_template = false\n'
                   '[[recipes]]\nname = "head_stats"\n'
                   '[[interventions]]\nlabel = "emph"\nop = "scale"\nalpha = 0.001\nheads = [1, 3]\n'
                   'except_keys = { regex = "(?i)mill|nobody|boat" }\n'
                   '[[interventions]]\nlabel = "none"\nop = "zero"\nkeys = { regex = "zebra" }\n')
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    ds = open_dataset(tmp_path / "out")
    effects = ds.to_pandas("effects").sort_values(["label", "doc_id"])
    documents = ds.to_pandas("documents").sort_values("doc_id")
    assert effects[effects.label == "none"].generated_text.tolist() == documents.generated_text.tolist()
    tokens = ds.to_pandas("tokens").sort_values(["doc_id", "position"])
    docs = sorted(tokens.doc_id.unique())
    prompts = [tokens[(tokens.doc_id == d) & (tokens.side == "source")] for d in docs]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(docs), width), tokenizer.pad_token_id)
    mask, selected = torch.zeros_like(ids), torch.zeros(len(docs), width, dtype=torch.bool)
    for b, (p, row) in enumerate(zip(prompts, sorted(rows, key=lambda r: r["id"]))):
        pad = width - len(p)
        ids[b, pad:] = torch.tensor(p.token_id.tolist())
        mask[b, pad:] = 1
        spans = [m.span() for m in re.finditer("(?i)mill|nobody|boat", row["text"])]
        hit = [e > s and any(s < b_ and e > a_ for a_, b_ in spans) for s, e in zip(p.char_start, p.char_end)]
        selected[b, pad:] = ~torch.tensor(hit)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="ref_generate").eval()
    _EDITS["generate"] = (selected, math.log(0.001), torch.tensor([False, True, False, True]))
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        _EDITS.clear()
    want = [decoded(tokenizer, out[b, width:].tolist())[0] for b in range(len(docs))]
    assert effects[effects.label == "emph"].generated_text.tolist() == want
    assert want != documents.generated_text.tolist()  # the edit changed what was generated
    assert effects[effects.label == "emph"]["keys"].tolist() == [len(p) - 1 for p in prompts]  # one marked word each


def test_out_of_memory_halves_the_intervened_batch(tmp_path, tiny_model_dir, monkeypatch):
    """CUDA running out of memory in an intervened pass: the batch is measured in halves, with
    the same rows as one pass (simulated on the CPU: batches of more than one window fail)."""
    from attnpipe.control import run as control_run

    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    job = write_job(tmp_path, _corpus(tmp_path, rows), tiny_model_dir("gpt2"), extra='id_column = "id"',
                    recipes='[[recipes]]\nname = "head_stats"\n[[interventions]]\nop = "zero"\nkeys = { regex = "the" }\n'
                            '[effects]\nlogits = true\n')
    assert invoke("run", job).exit_code == 0
    whole = pq.read_table(next((tmp_path / "out").glob("effects/*.parquet"))).to_pandas()
    real = control_run.effects_batch

    def tight(rt, windows, *args):
        if len(windows) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(rt, windows, *args)

    monkeypatch.setattr(control_run, "effects_batch", tight)
    result = invoke("run", job, "--output", tmp_path / "halved")
    assert result.exit_code == 0, result.output
    halved = pq.read_table(next((tmp_path / "halved").glob("effects/*.parquet"))).to_pandas()
    assert halved["doc_id"].tolist() == whole["doc_id"].tolist()
    for col in ("cosine", "kl_mean", "kl_last", "keys"):
        np.testing.assert_allclose(halved[col].to_numpy(float), whole[col].to_numpy(float), atol=1e-5)


def test_class_kl_of_a_sequence_classifier(tmp_path, tokenizer):
    """effects.logits on a folder saved from BertForSequenceClassification: the classifier head is
    loaded, and kl_class is KL(clean || edited) of its class distributions, computed here with the
    reference attention (mask + bias) on an untouched copy of the same weights."""
    from transformers import AutoModelForSequenceClassification

    from conftest import TINY_CONFIGS

    torch.manual_seed(0)
    config = TINY_CONFIGS["bert"]()
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config).eval()
    folder = tmp_path / "classifier"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = [{"id": "d1", "text": "The nurse said that she was tired."}]
    job = write_job(tmp_path, _corpus(tmp_path, rows), folder, extra='id_column = "id"',
                    recipes='[[recipes]]\nname = "head_stats"\n[[interventions]]\nop = "zero"\nlayers = [1]\n'
                            'keys = { regex = "nurse" }\n[effects]\nlogits = true\n')
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    row = pq.read_table(next((tmp_path / "out").glob("effects/*.parquet"))).to_pylist()[0]
    assert row["kl_mean"] is None and row["kl_class"] > 0
    windows = tokenize(tokenizer, [rows[0]["text"]], 64, 8)
    ids, mask = collate(windows, tokenizer.pad_token_id)
    chosen = torch.tensor([[b > a and a < 9 and b > 4 for a, b in windows[0].offsets]])
    bias = torch.zeros(1, 4, ids.shape[1], ids.shape[1])
    bias[:] = torch.where(chosen[:, None, :], -math.inf, 0.0)[:, None]
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(REF)
    logits = []
    for edits in ({}, {"bias": {1: bias}}):
        _EDITS.clear()
        _EDITS.update(edits, names=module_names(ref))
        with torch.no_grad():
            logits.append(torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits, -1)[0])
        _EDITS.clear()
    clean, edited = logits
    want = (clean.exp() * (clean - edited)).sum().item()
    assert row["kl_class"] == pytest.approx(want, abs=1e-5, rel=1e-3)
    (tmp_path / "plain").mkdir()
    plain = write_job(tmp_path / "plain", _corpus(tmp_path, rows), folder, extra='id_column = "id"')
    assert invoke("run", plain).exit_code == 0  # without effects the same folder loads as a bare encoder


def test_class_kl_needs_a_head(tmp_path, tiny_model_dir):
    rows = [{"id": "d1", "text": "The nurse said that she was tired."}]
    job = write_job(tmp_path, _corpus(tmp_path, rows), tiny_model_dir("bert"), extra='id_column = "id"',
                    recipes='[[recipes]]\nname = "head_stats"\n[[interventions]]\nop = "zero"\n'
                            'keys = { regex = "nurse" }\n[effects]\nlogits = true\n')
    line = error_line(invoke("run", job))
    assert "[effects] logits = true needs a decoder language model" in line and "(bert)" in line
