"""Encoder-decoder models, all three attentions: source/target pairs run teacher-forced.

Every site (encoder self, decoder self, decoder cross) equals HF eager `output_attentions=True`
(encoder_attentions, decoder_attentions, cross_attentions; float32, 1e-5) on tiny T5, BART and
Marian, with padding on both sides of the batch, for each backend; and every recipe's rows on
each site equal the plain float64 reference (tests/reference.py) on those eager maps.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModel, MarianConfig

import reference as ref
from attnpipe.capture import capture_layers
from attnpipe.model import LoadedModel
from attnpipe.pairs import tokenize_pairs
from attnpipe.recipes import recipe_id, validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.windows import collate

from conftest import TINY_CONFIGS, VOCAB
from test_recipes_eager import MAX_MAYBE_FRACTION, SPECS, TIE

ATOL = 1e-5
SOURCES = ["The animal didn't cross the street because it was too tired.", "Short one.",
           "A somewhat longer sentence, with commas, numbers like 42, and a question at the end?"]
# The longest target is not the longest source's: both sides are padded, differently.
TARGETS = ["It was tired.", "A target much longer than its own source text, for once, with commas.", "Why?"]
CONFIGS = {
    "t5": TINY_CONFIGS["t5"],
    "bart": TINY_CONFIGS["bart"],
    "marian": lambda: MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0,
                                   decoder_start_token_id=0, eos_token_id=102),
}
BACKENDS = ["eager", "sdpa", "fused"]
# Query scales that keep the tiny models' maps far from uniform yet free of near-ties at zero
# (T5 has no 1/sqrt(d) scaling and is sharp already).
SHARPEN = {"t5": 1.0, "bart": 30.0, "marian": 30.0}  # fused on a CPU: the kernels' torch reference


def pair_model(family: str, tokenizer, backend: str, sharpen: float = 1.0) -> tuple[LoadedModel, torch.nn.Module]:
    """(LoadedModel for capture, an untouched eager copy of the same weights)."""
    torch.manual_seed(0)
    model = AutoModel.from_config(CONFIGS[family](), attn_implementation="eager").eval()
    with torch.no_grad():  # queries scaled so the tiny models' maps are far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", ".q.weight")):
                p.mul_(sharpen)
    reference = copy.deepcopy(model)
    return LoadedModel(model, tokenizer, f"tiny-{family}", torch.device("cpu"), backend=backend), reference


def pair_batch(lm: LoadedModel):
    windows = tokenize_pairs(lm, SOURCES, TARGETS, 64, [f"doc{i}" for i in range(len(SOURCES))])
    ids, mask = collate(windows, lm.pad_id)
    dec_ids, dec_mask = collate([w.target for w in windows], lm.pad_id)
    return windows, ids, mask, dec_ids, dec_mask


def eager_pair_attentions(model, ids, mask, dec_ids, dec_mask) -> dict[tuple[str, str], list[torch.Tensor]]:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids,
                    decoder_attention_mask=dec_mask, output_attentions=True)
    return {("encoder", "self"): list(out.encoder_attentions), ("decoder", "self"): list(out.decoder_attentions),
            ("decoder", "cross"): list(out.cross_attentions)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_site_equals_eager(family, backend, tokenizer):
    lm, reference = pair_model(family, tokenizer, backend)
    windows, ids, mask, dec_ids, dec_mask = pair_batch(lm)
    assert (mask == 0).any() and (dec_mask == 0).any(), "both sides must be padded"
    assert ids.shape[1] != dec_ids.shape[1]
    captured = {}

    def sink(inputs):
        captured[(inputs.site.stack, inputs.site.kind, inputs.site.layer)] = inputs.probs.clone()

    with capture_layers(sink, backend=lm.capture_backend, model=lm.model, causal=lm.causal):
        lm.forward(ids, mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)
    expected = eager_pair_attentions(reference, ids, mask, dec_ids, dec_mask)
    src, tgt = mask.bool(), dec_mask.bool()
    sides = {("encoder", "self"): (src, src), ("decoder", "self"): (tgt, tgt), ("decoder", "cross"): (tgt, src)}
    assert len(captured) == sum(len(v) for v in expected.values()) == 6
    for (stack, kind), maps in expected.items():
        q, k = sides[(stack, kind)]
        for layer, want in enumerate(maps):
            got = captured[(stack, kind, layer)]
            assert got.shape == want.shape == (len(windows), 4, q.shape[1], k.shape[1])
            valid = (q[:, None, :, None] & k[:, None, None, :]).expand_as(got)
            torch.testing.assert_close(got[valid], want[valid], atol=ATOL, rtol=0)


def test_decoder_input_is_the_models_own_shift(tokenizer):
    """T5: the pad id starts the decoder; BART: decoder_start_token_id (2); then the target but the last."""
    for family, start in (("t5", 0), ("bart", 2)):
        lm, _ = pair_model(family, tokenizer, "eager")
        w = tokenize_pairs(lm, ["a b"], ["one two"], 64, ["d"])[0]
        labels = tokenizer("one two")["input_ids"]
        assert w.target.input_ids == [start] + labels[:-1]
        assert w.target.special[0] and w.target.offsets[0] == (0, 0)
        assert w.target.offsets[2] == (0, 3)  # "one", read at position 2 (label 1, after [CLS])


# --- every recipe on every site, against the float64 reference ---------------------------------

def _side_masks(lm, windows_or_targets, ids, causal: bool) -> ref.Masks:
    lengths = np.array([len(w) for w in windows_or_targets])
    batch, size = ids.shape
    valid = np.arange(size)[None, :] < lengths[:, None]
    special = np.zeros((batch, size), dtype=bool)
    for row, w in enumerate(windows_or_targets):
        special[row, : len(w)] = w.special
    sep = np.isin(ids.numpy(), sorted(lm.sep_ids)) & valid
    punct = lm.punct_table.numpy()[ids.numpy()] & valid
    return ref.Masks(lengths, special, sep, punct, causal)


class PairCase:
    def __init__(self, family: str, backend: str, tokenizer):
        lm, reference = pair_model(family, tokenizer, backend, sharpen=SHARPEN[family])
        self.lm, self.family, self.backend = lm, family, backend
        windows, ids, mask, dec_ids, dec_mask = pair_batch(lm)
        self.outputs = reduce_batch(lm, windows, SPECS)
        maps = eager_pair_attentions(reference, ids, mask, dec_ids, dec_mask)
        self.maps = {site: [m.double().numpy() for m in layers] for site, layers in maps.items()}
        source = _side_masks(lm, windows, ids, causal=False)
        target = _side_masks(lm, [w.target for w in windows], dec_ids, causal=True)
        cross = ref.Masks(target.lengths, target.special, target.sep, target.punct, False, keys=source)
        self.masks = {("encoder", "self"): source, ("decoder", "self"): target, ("decoder", "cross"): cross}

    def columns(self, recipe: int, site) -> list[dict]:
        by_layer = {o.layer: o.columns for o in self.outputs if o.recipe == recipe and o.site == site}
        assert sorted(by_layer) == [0, 1], f"{site}: layers {sorted(by_layer)}"
        return [by_layer[0], by_layer[1]]


@pytest.fixture(scope="module", params=[(f, b) for f in CONFIGS for b in BACKENDS],
                ids=[f"{f}-{b}" for f in CONFIGS for b in BACKENDS])
def case(request, tokenizer):
    return PairCase(*request.param, tokenizer)


def test_one_output_per_recipe_site_and_layer(case):
    counts = Counter((o.recipe, o.site, o.layer) for o in case.outputs)
    rollout = {i for i, s in enumerate(SPECS) if s["name"] == "rollout"}
    want = Counter({(i, site, layer): 1 for i in range(len(SPECS)) for site in case.masks for layer in (0, 1)
                    if not (i in rollout and site == ("decoder", "cross"))})
    assert counts == want


@pytest.mark.parametrize("site", [("encoder", "self"), ("decoder", "self"), ("decoder", "cross")],
                         ids=["encoder-self", "decoder-self", "decoder-cross"])
@pytest.mark.parametrize("i", range(len(SPECS)), ids=[recipe_id(s) for s in SPECS])
def test_recipe_equals_reference_on_each_site(case, site, i):
    spec = SPECS[i]
    name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    m, maps = case.masks[site], case.maps[site]
    kernels_run_it = case.backend == "fused" and case.family != "t5" and site != ("decoder", "cross")
    if kernels_run_it and (name == "rollout" or (name != "topk" and not params.get("per_head", True))):
        pytest.skip("the fused kernels' bfloat16 head-mean map (compared in test_backends and test_kernels)")
    if name == "rollout":
        if site == ("decoder", "cross"):
            assert not [o for o in case.outputs if o.recipe == i and o.site == site]
            return
        for cols, want in zip(case.columns(i, site), ref.ref_rollout(maps, m, k=params["k"], tie=TIE)):
            assert want.n_maybe <= MAX_MAYBE_FRACTION * max(1, len(want.status))
            ref.assert_edges(cols, want, ATOL, with_head=False)
        return
    for cols, probs in zip(case.columns(i, site), maps):
        if name == "head_stats":
            ref.assert_head_stats(cols, ref.ref_head_stats(probs, m), ATOL)
        elif name == "dense":
            ref.assert_dense(cols, ref.ref_dense(probs, m, **params), ATOL)
        else:
            want = getattr(ref, f"ref_{name}")(probs, m, **params, tie=TIE)
            assert want.n_maybe <= MAX_MAYBE_FRACTION * max(1, len(want.status))
            ref.assert_edges(cols, want, ATOL)


def test_cross_rows_stay_inside_both_sides(case):
    """Queries are target positions, keys source positions, and no causal cut applies across them."""
    m = case.masks[("decoder", "cross")]
    later = 0
    for o in case.outputs:
        if o.site != ("decoder", "cross") or "key_pos" not in o.columns:
            continue
        c = o.columns
        assert (c["query_pos"] < m.lengths[c["batch_index"]]).all()
        assert (c["key_pos"] < m.keys.lengths[c["batch_index"]]).all()
        later += int((c["key_pos"] > c["query_pos"]).sum())
    assert later > 0


def test_specs_are_valid():
    assert all(validate_recipe(s, "test") == s for s in SPECS)


# --- jobs: refusals and a whole run ---------------------------------------------------------------

def pairs_csv(tmp_path, rows=None):
    import csv

    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "summary"])
        w.writerows(rows or list(zip(SOURCES, TARGETS)))
    return path


RUN_RECIPES = "".join(f'[[recipes]]\nname = "{n}"\n{extra}' for n, extra in [
    ("head_stats", ""), ("topk", "k = 3\nper_head = false\n"), ("rollout", "k = 3\n"), ("dense", "")])


def run_pairs(tmp_path, model, extra='target_column = "summary"', **run):
    from conftest import invoke, write_job

    job = write_job(tmp_path, pairs_csv(tmp_path), model, recipes=RUN_RECIPES, extra=extra, device="cpu", **run)
    return invoke("run", job), tmp_path / "out"


def test_target_column_refused_for_a_model_without_a_decoder(tmp_path, tiny_model_dir):
    result, _ = run_pairs(tmp_path, tiny_model_dir("bert"))
    assert result.exit_code == 1
    assert result.output.startswith("Error: corpus.target_column ('summary') needs an encoder-decoder model")
    assert len(result.output.strip().splitlines()) == 1


def test_a_side_longer_than_the_window_is_refused_naming_the_document(tmp_path, tiny_model_dir):
    from conftest import invoke, write_job

    rows = [("short source", "word " * 80), ("fine", "fine")]
    job = write_job(tmp_path, pairs_csv(tmp_path, rows), tiny_model_dir("bart"), extra='target_column = "summary"\n'
                    'id_column = "text"', device="cpu")
    result = invoke("run", job)
    assert result.exit_code == 1
    assert "document 'short source': its target has 82 tokens, more than the window's 64" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, says", [
    ('target_column = "text"', "'corpus.target_column' 'text' is also the text, id or a metadata column"),
    ('target_column = "summary"\nformat = "text"', "plain text files hold one text per document"),
    ('target_column = "missing"', "corpus.target_column: column 'missing' is not in corpus")])
def test_bad_target_columns(tmp_path, tiny_model_dir, extra, says):
    result, _ = run_pairs(tmp_path, tiny_model_dir("bart"), extra=extra)
    assert result.exit_code == 1 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_changed_target_text_is_a_changed_document_on_rerun(tmp_path, tiny_model_dir):
    first, out = run_pairs(tmp_path, tiny_model_dir("bart"))
    assert first.exit_code == 0, first.output
    rows = list(zip(SOURCES, TARGETS))
    rows[0] = (rows[0][0], rows[0][1] + " Edited.")
    pairs_csv(tmp_path, rows)  # the same sources, one target edited in place
    from conftest import invoke

    again = invoke("run", tmp_path / "job.toml")
    assert again.exit_code == 1 and "corpus changed" in again.output and "--new-run" in again.output


def test_encoder_decoder_without_target_keeps_the_encoder_only_run(tmp_path, tiny_model_dir):
    from attnpipe.read import open_dataset

    result, out = run_pairs(tmp_path, tiny_model_dir("t5"), extra="")
    assert result.exit_code == 0, result.output
    ds = open_dataset(out)
    assert ds.sql("SELECT DISTINCT stack, attention FROM edges").values.tolist() == [["encoder", "self"]]
    assert ds.sql("SELECT DISTINCT side FROM tokens").values.tolist() == [["source"]]
    assert (out / "edges" / "layer-000").is_dir()


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("pairs")
    result, out = run_pairs(tmp, tiny_model_dir("bart"), attention="fused", weight_dtype="float32")
    assert result.exit_code == 0, result.output
    return out


def test_a_pair_run_writes_every_site(pair_run):
    from attnpipe.read import open_dataset
    from attnpipe.store import read_records

    ds = open_dataset(pair_run)
    sites = ds.sql("SELECT stack, attention, count(*) AS n FROM edges GROUP BY ALL ORDER BY ALL")
    assert sites[["stack", "attention"]].values.tolist() == [["decoder", "cross"], ["decoder", "self"],
                                                              ["encoder", "self"]]
    assert ds.sql("SELECT DISTINCT stack, attention FROM rollout ORDER BY ALL").values.tolist() == [
        ["decoder", "self"], ["encoder", "self"]]
    stats = ds.sql("SELECT attention, count(*) AS n, count(self_mass) AS self, count(mean_distance) AS dist, "
                   "count(entropy) AS entropy FROM head_stats WHERE stack = 'decoder' GROUP BY ALL ORDER BY ALL")
    assert stats.values.tolist() == [["cross", 24, 0, 0, 24], ["self", 24, 24, 24, 24]]  # null, not zero
    sides = ds.sql("SELECT side, count(*) AS n FROM tokens GROUP BY ALL ORDER BY ALL")
    assert sides["side"].tolist() == ["source", "target"]
    assert {p.parent.parent.name for p in (pair_run / "edges").rglob("*.parquet")} == {
        "encoder-self", "decoder-self", "decoder-cross"}
    prov = read_records(pair_run)[0]["provenance"]
    assert prov["target_column"] == "summary" and "cross-attention layers run the torch recipes" in prov[
        "attention_fallback"]


# --- the read side --------------------------------------------------------------------------------

def test_token_views_join_each_side(pair_run):
    """Cross rows: the query token is a target token, the key token a source token."""
    from attnpipe.read import open_dataset

    ds = open_dataset(pair_run)
    view = ds.sql("SELECT doc_id, stack, attention, query_pos, query_token, key_pos, key_token FROM edges_tokens")
    assert len(view) == len(ds.sql("SELECT * FROM edges"))  # every row joins exactly once
    tokens = ds.sql("SELECT doc_id, side, position, token FROM tokens")
    token = {(d, s, p): t for d, s, p, t in tokens.itertuples(index=False)}
    side = {("encoder", "self"): ("source", "source"), ("decoder", "self"): ("target", "target"),
            ("decoder", "cross"): ("target", "source")}
    for r in view.itertuples(index=False):
        q, k = side[(r.stack, r.attention)]
        assert (r.query_token, r.key_token) == (token[(r.doc_id, q, r.query_pos)], token[(r.doc_id, k, r.key_pos)])
    assert "rollout_tokens" in ds.query.views


def test_heads_plot_and_report_know_the_sites(pair_run, tmp_path):
    from attnpipe.read import open_dataset
    from attnpipe.read.matrices import attention_matrix
    from conftest import invoke

    ds = open_dataset(pair_run)
    atlas = ds.heads()
    assert sorted({(s, a) for s, a in zip(atlas["stack"], atlas["attention"])}) == [
        ("decoder", "cross"), ("decoder", "self"), ("encoder", "self")]
    assert atlas[atlas["attention"] == "cross"]["prev_mass"].isna().all()
    doc = ds.sql("SELECT doc_id FROM documents ORDER BY doc_id LIMIT 1")["doc_id"][0]
    m = attention_matrix(ds, doc, 1, -1, site="decoder-cross")
    target, source = (ds.sql(f"SELECT count(*) FROM tokens WHERE doc_id = '{doc}' AND side = '{s}'").iloc[0, 0]
                      for s in ("target", "source"))
    assert m.weights.shape == (target, source) and (m.row_name, m.col_name) == ("target token", "source token")
    assert len(m.row_labels) == target and len(m.col_labels) == source
    for args in (["--doc", doc, "--layer", "1", "--head", "mean", "--site", "decoder-cross"], ["--grid", "entropy_norm"]):
        result = invoke("plot", pair_run, "-o", tmp_path / "p.png", *args)
        assert result.exit_code == 0, result.output
    result = invoke("report", pair_run, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    result = invoke("heads", pair_run)
    assert result.exit_code == 0 and "decoder-cross" in result.output
