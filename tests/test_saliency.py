"""Saliency recipes against autograd on HF eager attention, computed independently.

The reference is HF's eager attention with output_attentions=True: the maps it returns are the
probabilities its graph uses, so `retain_grad()` on them gives dF/dA. F is computed in the test
from the model's outputs, not through pipeline/control/scalars.py. Tolerances: float32 models,
rtol 1e-4 with atol 1e-6 (different but equivalent summation orders); the integrated-gradients
sum against a hand-written Riemann sum through HF eager: the same tolerance.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, error_line, invoke, raises_one_line, write_job
from transformers import AutoModel, AutoModelForCausalLM

from attnpipe.errors import RecipeError
from attnpipe.model import LoadedModel
from attnpipe.recipes import validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.windows import collate, tokenize

TEXTS = ["The animal didn't cross the street because it was too tired.", "Short one here.",
         "Why do we yawn after we see someone else yawn?"]
TOL = dict(rtol=1e-4, atol=1e-6)
ALL_KEYS = 128  # k larger than any window: every real (query, key) pair is stored


def tiny(arch: str, tokenizer, seed: int = 0) -> tuple[LoadedModel, torch.nn.Module]:
    """A LoadedModel and an untouched copy; llama with its (untied) language-model head."""
    torch.manual_seed(seed)
    kind = AutoModelForCausalLM if arch == "llama" else AutoModel
    model = kind.from_config(TINY_CONFIGS[arch](), attn_implementation="eager").eval()
    reference = copy.deepcopy(model)
    return LoadedModel(model, tokenizer, f"tiny-{arch}", torch.device("cpu")), reference


def batch(tokenizer):
    windows = tokenize(tokenizer, TEXTS, 64, 8)
    ids, mask = collate(windows, 0)
    return windows, ids, mask


def reference_scalar(arch: str, model, out, ids, mask) -> torch.Tensor:
    """F per window, written out from the model's outputs: pooled_norm for bert, the summed
    log-probability of the window's own next tokens for gpt2 (tied embeddings) and llama."""
    if arch == "bert":
        m = mask[..., None].float()
        return ((out.last_hidden_state * m).sum(1) / m.sum(1)).norm(dim=-1)
    logits = out.logits if arch == "llama" else out.last_hidden_state @ model.get_input_embeddings().weight.T
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(1)


def reference_grads(arch: str, model, ids, mask):
    """(F, [A per layer], [dF/dA per layer]) from HF eager with output_attentions=True."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    value = reference_scalar(arch, model, out, ids, mask)
    value.sum().backward()
    return value.detach(), [a.detach() for a in out.attentions], [a.grad for a in out.attentions]


def valid_pairs(windows, size: int, causal: bool) -> torch.Tensor:  # (batch, 1, q, k)
    lengths = torch.tensor([len(w) for w in windows])
    real = torch.arange(size)[None, :] < lengths[:, None]
    valid = real[:, None, :, None] & real[:, None, None, :]
    return valid & torch.ones(size, size, dtype=torch.bool).tril() if causal else valid


def dense(cols: dict, shape, column: str = "attribution") -> torch.Tensor:
    """Rows of one layer back into a (batch, head, q, k) tensor (zeros where no row)."""
    out = torch.zeros(shape, dtype=torch.float64)
    head = np.maximum(cols["head"], 0)  # grad_rollout's head -1 -> 0
    out[cols["batch_index"], head, cols["query_pos"], cols["key_pos"]] = torch.from_numpy(
        cols[column].astype(np.float64))
    return out


def outputs(lm, windows, *recipes):
    specs = [validate_recipe(r, "test") for r in recipes]
    by = {}
    for o in reduce_batch(lm, windows, specs):
        by.setdefault(o.recipe, {})[o.layer] = o.columns
    return by


# --- attn_grad: A * dF/dA against autograd on HF eager ------------------------------------------

@pytest.mark.parametrize("texts", [3, 1], ids=["padded", "unpadded"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_attn_grad_matches_autograd_on_eager(arch, texts, tokenizer):
    lm, reference = tiny(arch, tokenizer)
    windows = tokenize(tokenizer, TEXTS[:texts], 64, 8)
    ids, mask = collate(windows, 0)
    value, probs, grads = reference_grads(arch, reference, ids, mask)
    got = outputs(lm, windows, {"name": "attn_grad", "k": ALL_KEYS}, {"name": "attn_grad_heads"},
                  {"name": "attn_grad", "k": 2})
    valid = valid_pairs(windows, ids.shape[1], lm.causal)
    assert len(got[0]) == len(probs) == 2
    for layer, (a, g) in enumerate(zip(probs, grads)):
        expected = (a * g).masked_fill(~valid, 0.0).double()
        torch.testing.assert_close(dense(got[0][layer], a.shape), expected, **TOL)
        torch.testing.assert_close(dense(got[0][layer], a.shape, "weight"), a.masked_fill(~valid, 0).double(), **TOL)
        heads = got[1][layer]
        torch.testing.assert_close(torch.from_numpy(heads["attribution_sum"]).double(),
                                   expected.sum((2, 3)).flatten(), **TOL)
        torch.testing.assert_close(torch.from_numpy(heads["scalar"]), value[heads["batch_index"]], **TOL)
        # k = 2: min(2, keys seen) rows per real query, none smaller than the row's 2nd largest |value|
        top = got[2][layer]
        b, h, q = top["batch_index"], top["head"], top["query_pos"]
        second = expected.abs().masked_fill(~valid, -1.0).topk(2, dim=-1).values[..., -1].clamp_min(0)
        assert np.all(np.abs(top["attribution"]) >= second[b, h, q].numpy() - 1e-6)
        counts = np.zeros(expected.shape[:3], dtype=int)
        np.add.at(counts, (b, h, q), 1)
        seen = valid.sum(-1).expand(expected.shape[:3]).numpy()
        assert np.array_equal(counts, np.minimum(2, seen))


def test_logprob_last_and_target_token_on_gpt2(tokenizer):
    """position = last: only log p(x_{n-1} | x_{<n-1}); scalar = token: log p(token | window)."""
    lm, reference = tiny("gpt2", tokenizer)
    windows, ids, mask = batch(tokenizer)
    out = reference(input_ids=ids, attention_mask=mask)
    logp = torch.log_softmax(out.last_hidden_state @ reference.get_input_embeddings().weight.T, -1)
    n = mask.sum(1)
    rows = torch.arange(len(ids))
    last = logp[rows, n - 2, ids[rows, n - 1]]
    token = tokenizer("street", add_special_tokens=False)["input_ids"][0]
    after = logp[rows, n - 1, token]
    got = outputs(lm, windows, {"name": "attn_grad_heads", "scalar": "logprob", "position": "last"},
                  {"name": "attn_grad_heads", "scalar": "token", "token": "street"},
                  {"name": "attn_grad_heads", "scalar": "token", "token": token})
    for i, expected in [(0, last), (1, after), (2, after)]:
        cols = got[i][0]
        torch.testing.assert_close(torch.from_numpy(cols["scalar"]), expected.detach()[cols["batch_index"]], **TOL)


# --- attn_ig: completeness and a hand-written Riemann sum ---------------------------------------

def hand_riemann(model, ids, mask, layer: int, steps: int, shift: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hao et al. through HF's own eager BERT: softmax is patched so that layer `layer`'s
    probabilities become alpha * A (A from the unscaled pass), alpha = (j - shift) / steps.
    Returns (attribution, F(A), F(0))."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    softmax = torch.nn.functional.softmax
    state = {"calls": 0, "given": None}

    def patched(x, *args, **kwargs):
        p = softmax(x, *args, **kwargs)
        hit = state["calls"] % model.config.num_hidden_layers == layer
        state["calls"] += 1
        return state["given"] if hit and state["given"] is not None else p

    def scalar() -> torch.Tensor:
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        return ((h * m).sum(1) / m.sum(1)).norm(dim=-1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "softmax", patched)
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        probs = out.attentions[layer].detach()
        with torch.no_grad():
            full = scalar()
        total = torch.zeros_like(probs)
        for j in range(1, steps + 1):
            state["given"] = (probs * ((j - shift) / steps)).requires_grad_()
            scalar().sum().backward()
            total += state["given"].grad
        state["given"] = torch.zeros_like(probs)
        with torch.no_grad():
            zero = scalar()
    return probs * total / steps, full, zero


@pytest.mark.parametrize("rule, shift", [("right", 0.0), ("midpoint", 0.5)])
def test_attn_ig_equals_a_hand_written_riemann_sum(rule, shift, tokenizer):
    lm, reference = tiny("bert", tokenizer)
    windows, ids, mask = batch(tokenizer)
    got = outputs(lm, windows, {"name": "attn_ig", "k": ALL_KEYS, "steps": 7, "rule": rule},
                  {"name": "attn_ig_heads", "steps": 7, "rule": rule})
    valid = valid_pairs(windows, ids.shape[1], False)
    for layer in (0, 1):
        attribution, full, zero = hand_riemann(reference, ids, mask, layer, 7, shift)
        expected = attribution.masked_fill(~valid, 0.0).double()
        torch.testing.assert_close(dense(got[0][layer], attribution.shape), expected, **TOL)
        heads = got[1][layer]
        b = heads["batch_index"]
        torch.testing.assert_close(torch.from_numpy(heads["scalar_baseline"]), zero[b], **TOL)
        error = expected.sum((1, 2, 3)) - (full - zero).double()
        torch.testing.assert_close(torch.from_numpy(heads["completeness_error"]).double(), error[b],
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_attn_ig_completeness_converges(arch, tokenizer):
    """|sum of attributions - (F(A) - F(0_l))| shrinks like 1/steps (a right Riemann sum's error):
    four times the steps, about a quarter of the error, on every window and layer. (A random tiny
    model's F hardly depends on its attention; the real model's relative error is tested below.)"""
    lm, _ = tiny(arch, tokenizer, seed=3)
    windows, _, _ = batch(tokenizer)
    errors = {}
    for steps in (2, 8, 32):
        heads = outputs(lm, windows, {"name": "attn_ig_heads", "steps": steps})[0]
        errors[steps] = np.stack([np.abs(c["completeness_error"]) for _, c in sorted(heads.items())])
    assert np.all(errors[8] < errors[2] / 3) and np.all(errors[32] < errors[8] / 3)


def test_attn_ig_on_minilm_demo_sentences(minilm):
    """The real model: at 20 steps (Hao et al.'s choice) the completeness error is within 15% of
    F(A) - F(0_l) on every layer (measured: 0.6% to 13%), and at 80 steps about a quarter of it;
    the midpoint rule is within 2.5% at 5 steps (measured: at most 1.9%)."""
    windows = tokenize(minilm.tokenizer, TEXTS[:2], 128, 32)
    errors = {}
    for steps in (20, 80):
        heads = outputs(minilm, windows, {"name": "attn_ig_heads", "steps": steps})[0]
        assert sorted(heads) == list(range(6))
        errors[steps] = np.stack([np.abs(c["completeness_error"]) for _, c in sorted(heads.items())])
        change = np.stack([np.abs(c["scalar"] - c["scalar_baseline"]) for _, c in sorted(heads.items())])
    assert np.all(errors[20] <= 0.15 * change)
    assert np.all(errors[80] <= 0.3 * errors[20])
    heads = outputs(minilm, windows, {"name": "attn_ig_heads", "steps": 5, "rule": "midpoint"})[0]
    for cols in heads.values():
        assert np.all(np.abs(cols["completeness_error"]) <= 0.025 * np.abs(cols["scalar"] - cols["scalar_baseline"]))


# --- grad_rollout against a plain implementation ------------------------------------------------

def plain_grad_rollout(probs, grads, windows) -> list[np.ndarray]:
    """Per window, one layer at a time: M = mean_h relu(A * G) + I on real tokens, rows summing to
    one, R_l = M_l R_{l-1}."""
    out = []
    rolled = [None] * len(windows)
    for a, g in zip(probs, grads):
        layer = np.zeros(a.shape[:1] + a.shape[2:])
        for b, w in enumerate(windows):
            n = len(w)
            mixed = np.clip((a[b, :, :n, :n] * g[b, :, :n, :n]).double().numpy(), 0, None).mean(0) + np.eye(n)
            mixed /= mixed.sum(-1, keepdims=True)
            rolled[b] = mixed if rolled[b] is None else mixed @ rolled[b]
            layer[b, :n, :n] = rolled[b]
        out.append(layer)
    return out


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_grad_rollout_matches_a_plain_implementation(arch, tokenizer):
    lm, reference = tiny(arch, tokenizer, seed=1)
    windows, ids, mask = batch(tokenizer)
    _, probs, grads = reference_grads(arch, reference, ids, mask)
    got = outputs(lm, windows, {"name": "grad_rollout", "k": ALL_KEYS})[0]
    for layer, expected in enumerate(plain_grad_rollout(probs, grads, windows)):
        cols = got[layer]
        assert set(cols["head"]) == {-1}
        shape = (len(windows), 1) + expected.shape[1:]
        torch.testing.assert_close(dense(cols, shape)[:, 0], torch.from_numpy(expected), **TOL)
        if lm.causal:
            assert np.all(cols["key_pos"] <= cols["query_pos"])


# --- a job end to end, and bad parameters -------------------------------------------------------

def test_job_writes_saliency_tables(tmp_path, tiny_model_dir):
    from attnpipe.read import open_dataset

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    recipes = "".join(f"[[recipes]]\n{body}\n" for body in [
        'name = "head_stats"', 'name = "attn_grad"\nk = 4', 'name = "attn_grad_heads"',
        'name = "attn_ig"\nk = 4\nsteps = 4', 'name = "attn_ig_heads"\nsteps = 4', 'name = "grad_rollout"\nk = 3'])
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), recipes=recipes, device="cpu", weight_dtype="float32")
    result = invoke("run", job)
    assert result.exit_code == 0, result.output
    ds = open_dataset(tmp_path / "out")
    assert {"head_stats", "saliency", "saliency_heads"} <= set(ds.tables)
    counts = ds.sql("SELECT recipe, count(*) AS n, count(weight) AS w, max(key_pos <= query_pos OR true) AS ok "
                    "FROM saliency GROUP BY recipe ORDER BY recipe")
    assert list(counts["recipe"]) == ["attn_grad", "attn_ig", "grad_rollout"]
    assert counts.set_index("recipe").loc["grad_rollout", "w"] == 0  # no attention weight on rollout rows
    heads = ds.sql("SELECT recipe, layer, head, attribution_sum, scalar, completeness_error FROM saliency_heads")
    assert set(heads["recipe"]) == {"attn_grad_heads", "attn_ig_heads"}
    assert heads[heads.recipe == "attn_grad_heads"]["completeness_error"].isna().all()
    assert heads[heads.recipe == "attn_ig_heads"]["completeness_error"].notna().all()
    joined = ds.sql("SELECT t.token, s.attribution FROM saliency s JOIN tokens t ON t.doc_id = s.doc_id AND "
                    "t.window_index = s.window_index AND t.position = s.key_pos WHERE s.recipe = 'attn_grad' LIMIT 3")
    assert len(joined) == 3


@pytest.mark.parametrize("spec, words", [
    ({"name": "attn_grad", "scalar": "token"}, "token is given exactly when scalar = 'token'"),
    ({"name": "attn_grad", "token": 5}, "token is given exactly when scalar = 'token'"),
    ({"name": "attn_grad_heads", "scalar": "class"}, "label is given exactly when scalar = 'class'"),
    ({"name": "attn_ig", "steps": 0}, "'steps'"),
    ({"name": "attn_grad", "scalar": "logit"}, "'scalar'"),
    ({"name": "grad_rollout", "level": "word"}, "'level'"),
    ({"name": "attn_ig", "alpha": 2}, "unknown parameter 'alpha'"),
])
def test_bad_parameters_give_one_line(spec, words):
    message = raises_one_line(RecipeError, validate_recipe, spec, "job.toml: recipes[0]")
    assert words in message and message.startswith("job.toml: recipes[0]")


@pytest.mark.parametrize("recipe, words", [
    ('name = "attn_grad"\nscalar = "logprob"', "needs a decoder language model"),
    ('name = "attn_grad"\nscalar = "class"\nlabel = 1', "needs a sequence-classification model"),
])
def test_scalars_the_model_cannot_give_fail_in_one_line(tmp_path, tiny_model_dir, recipe, words):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), recipes=f"[[recipes]]\n{recipe}\n", device="cpu")
    assert words in error_line(invoke("run", job))


def test_token_that_is_several_tokens_fails_in_one_line(tokenizer):
    lm, _ = tiny("gpt2", tokenizer)
    windows, _, _ = batch(tokenizer)
    spec = validate_recipe({"name": "attn_grad", "scalar": "token", "token": "unbelievably tired"}, "r")
    assert "give one token or its id" in raises_one_line(RecipeError, reduce_batch, lm, windows, [spec])
    spec = validate_recipe({"name": "attn_grad", "scalar": "token", "token": VOCAB + 5}, "r")
    assert "not a token id" in raises_one_line(RecipeError, reduce_batch, lm, windows, [spec])


def test_the_model_is_restored_after_a_gradient_pass(tokenizer):
    lm, _ = tiny("bert", tokenizer)
    windows, _, _ = batch(tokenizer)
    outputs(lm, windows, {"name": "attn_grad"}, {"name": "head_stats"})
    assert lm.model.config._attn_implementation == "attnpipe"
    assert all(p.requires_grad for p in lm.model.parameters())


def test_class_logit_and_a_stored_lm_head_from_model_folders(tmp_path, tokenizer):
    """scalar = class runs the folder's classifier head on the loaded layers; logprob on a bare
    Llama (untied embeddings) reads lm_head.weight from the folder's safetensors."""
    from transformers import AutoModelForSequenceClassification

    from attnpipe.model import load_model

    windows, ids, mask = batch(tokenizer)
    torch.manual_seed(0)
    config = TINY_CONFIGS["bert"]()
    config.num_labels, config.id2label = 3, {0: "neg", 1: "neu", 2: "pos"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    for arch, model, spec in [
        ("bert", AutoModelForSequenceClassification.from_config(config), {"scalar": "class", "label": "pos"}),
        ("llama", AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()), {"scalar": "logprob"})]:
        folder = tmp_path / arch
        model.eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        expected = out.logits[:, 2] if arch == "bert" else reference_scalar("llama", model, out, ids, mask)
        lm = load_model(str(folder), device="cpu")
        assert type(lm.model).__name__ in ("BertModel", "LlamaModel")
        cols = outputs(lm, windows, {"name": "attn_grad_heads", **spec})[0][0]
        torch.testing.assert_close(torch.from_numpy(cols["scalar"]), expected[cols["batch_index"]], **TOL)


def test_a_causal_module_handed_no_mask_stays_causal():
    import types

    from attnpipe.control.gradients import grad_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    out, _ = grad_attention(types.SimpleNamespace(is_causal=True), q, k, v, None)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want, **TOL)
