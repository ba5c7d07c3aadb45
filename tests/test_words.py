"""Word level: `tokens.word_index`, the `words` table, and recipes with level = "word".

Word-level recipe rows are checked against the plain float64 references (tests/reference.py)
applied to word maps built here by loops from HF eager `output_attentions=True` maps and the
windows' word ids: to a word the sum over its pieces, from a word the mean over its pieces.
BERT, GPT-2 (causal) and Llama (GQA) on a right-padded batch; T5 and BART pairs (target words
over source words for cross-attention) with padding on both sides.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference as ref
from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.read import open_dataset
from attnpipe.recipes import recipe_id, recipe_params, validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.store.paths import recipe_label
from attnpipe.windows import collate, tokenize
from attnpipe.wordpieces import offset_words, window_words

from conftest import eager_attentions, invoke, loaded, write_job
from test_recipes_eager import CAUSAL_ARCHS, MAX_LENGTH, MAX_MAYBE_FRACTION, STRIDE, TEXTS, TIE, sharpen
from test_seq2seq import _side_masks, eager_pair_attentions, pair_batch, pair_model, SHARPEN

ATOL = 1e-5
WORD_SPECS = [validate_recipe({**s, "level": "word"}, "test") for s in [
    {"name": "head_stats"},
    {"name": "topk", "k": 3, "per_head": True},
    {"name": "topk", "k": 2, "per_head": False},
    {"name": "threshold", "t": 0.1, "per_head": True},
    {"name": "threshold", "t": 0.05, "per_head": False},
    {"name": "topp", "p": 0.9, "per_head": False},
    {"name": "rollout", "k": 4},
    {"name": "dense", "max_tokens": 16, "per_head": True},  # max_tokens counts words at word level
    {"name": "dense", "per_head": False},
]] + [validate_recipe({"name": "topk", "k": 2, "per_head": False}, "test")]  # a token-level recipe beside


# --- the plain reference: word maps and word masks by loops ---------------------------------------

def word_map(probs: np.ndarray, q_words: list[list[int]], k_words: list[list[int]]) -> np.ndarray:
    """(batch, head, query word, key word) float64: mean over the query word's pieces of the sum
    over the key word's pieces; zero beyond a window's words."""
    batch, heads = probs.shape[:2]
    nq, nk = max(max(w) + 1 for w in q_words), max(max(w) + 1 for w in k_words)
    out = np.zeros((batch, heads, nq, nk))
    for b in range(batch):
        for qw in range(max(q_words[b]) + 1):
            q_pieces = [i for i, w in enumerate(q_words[b]) if w == qw]
            for kw in range(max(k_words[b]) + 1):
                k_pieces = [i for i, w in enumerate(k_words[b]) if w == kw]
                for h in range(heads):
                    total = 0.0
                    for q in q_pieces:
                        for k in k_pieces:
                            total += float(probs[b, h, q, k])
                    out[b, h, qw, kw] = total / len(q_pieces)
    return out


def word_masks(m: ref.Masks, words: list[list[int]]) -> ref.Masks:
    """A word is special, a separator or punctuation when all its pieces are."""
    n = max(max(w) + 1 for w in words)
    flags = {name: np.zeros((len(words), n), dtype=bool) for name in ("special", "sep", "punct")}
    for b, ws in enumerate(words):
        for word in range(max(ws) + 1):
            pieces = [i for i, w in enumerate(ws) if w == word]
            for name in flags:
                flags[name][b, word] = all(getattr(m, name)[b, i] for i in pieces)
    return ref.Masks(np.array([max(ws) + 1 for ws in words]), flags["special"], flags["sep"], flags["punct"],
                     m.causal)


def check(spec: dict, per_layer: list[dict], maps: list[np.ndarray], m: ref.Masks) -> None:
    """A recipe's columns (one dict per layer) against the reference on word maps."""
    name = spec["name"]
    params = {k: v for k, v in spec.items() if k not in ("name", "level")}
    if name == "rollout":
        for cols, want in zip(per_layer, ref.ref_rollout(maps, m, k=params["k"], tie=TIE)):
            assert want.n_maybe <= MAX_MAYBE_FRACTION * max(1, len(want.status))
            ref.assert_edges(cols, want, ATOL, with_head=False)
        return
    for cols, probs in zip(per_layer, maps):
        if name == "head_stats":
            ref.assert_head_stats(cols, ref.ref_head_stats(probs, m), ATOL)
        elif name == "dense":
            want = ref.ref_dense(probs, m, **params)
            assert want, "max_tokens should keep some windows"
            ref.assert_dense(cols, want, ATOL)
        else:
            want = getattr(ref, f"ref_{name}")(probs, m, **params, tie=TIE)
            assert want.n_maybe <= MAX_MAYBE_FRACTION * max(1, len(want.status))
            ref.assert_edges(cols, want, ATOL)


# --- single-stack models ------------------------------------------------------------------------

class Case:
    def __init__(self, arch: str, tokenizer):
        lm, reference = loaded(arch, tokenizer)
        sharpen(lm.model, arch)
        sharpen(reference, arch)
        self.lm = lm
        self.windows = tokenize(tokenizer, TEXTS, max_length=MAX_LENGTH, stride=STRIDE)
        ids, mask = collate(self.windows, lm.pad_id)
        self.mask = mask
        self.outputs = reduce_batch(lm, self.windows, WORD_SPECS)
        words = [w.words for w in self.windows]
        tokens = _side_masks(lm, self.windows, ids, causal=arch in CAUSAL_ARCHS)
        self.m = word_masks(tokens, words)
        self.maps = [word_map(a.double().numpy(), words, words) for a in eager_attentions(reference, ids, mask)]

    def columns(self, recipe: int, site=None) -> list[dict]:
        by_layer = {o.layer: o.columns for o in self.outputs if o.recipe == recipe and site in (None, o.site)}
        assert sorted(by_layer) == [0, 1]
        return [by_layer[0], by_layer[1]]


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def case(request, tokenizer):
    return Case(request.param, tokenizer)


def test_batch_has_padding_and_words_of_several_pieces(case):
    assert (case.mask == 0).any()
    assert any(len(set(w.words)) < len(w) for w in case.windows), "some word must have several pieces"
    assert len(set(case.m.lengths)) >= 3 and case.m.special.any() and case.m.punct.any()


@pytest.mark.parametrize("i", range(len(WORD_SPECS) - 1), ids=[recipe_id(s) for s in WORD_SPECS[:-1]])
def test_word_recipe_equals_reference(case, i):
    check(WORD_SPECS[i], case.columns(i), case.maps, case.m)


def test_word_dense_rows_sum_to_one(case):
    dense = [i for i, s in enumerate(WORD_SPECS) if s["name"] == "dense"]
    for i in dense:
        for cols in case.columns(i):
            lengths = cols["weights.lengths"]
            sums = np.add.reduceat(cols["weights.values"].astype(np.float64), np.cumsum(lengths) - lengths)
            np.testing.assert_allclose(sums, 1.0, atol=1e-5)
            n = case.m.lengths[cols["batch_index"]]
            assert (cols["query_pos"] < n).all()
            assert (lengths == (cols["query_pos"] + 1 if case.m.causal else n)).all()


def test_token_level_recipe_beside_word_level_is_unchanged(case, tokenizer):
    """The last spec runs on tokens in the same batch: its rows index tokens, not words."""
    alone = reduce_batch(case.lm, case.windows, WORD_SPECS[-1:])
    for layer in (0, 1):
        got = next(o.columns for o in case.outputs if o.recipe == len(WORD_SPECS) - 1 and o.layer == layer)
        want = next(o.columns for o in alone if o.layer == layer)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


# --- encoder-decoder pairs: target words over source words ------------------------------------------

SITES = [("encoder", "self"), ("decoder", "self"), ("decoder", "cross")]


class PairCase:
    def __init__(self, family: str, backend: str, tokenizer):
        lm, reference = pair_model(family, tokenizer, backend, sharpen=SHARPEN[family])
        windows, ids, mask, dec_ids, dec_mask = pair_batch(lm)
        self.outputs = reduce_batch(lm, windows, WORD_SPECS)
        src_words, tgt_words = [w.words for w in windows], [w.target.words for w in windows]
        source = word_masks(_side_masks(lm, windows, ids, causal=False), src_words)
        target = word_masks(_side_masks(lm, [w.target for w in windows], dec_ids, causal=True), tgt_words)
        cross = ref.Masks(target.lengths, target.special, target.sep, target.punct, False, keys=source)
        self.masks = dict(zip(SITES, [source, target, cross]))
        words = dict(zip(SITES, [(src_words, src_words), (tgt_words, tgt_words), (tgt_words, src_words)]))
        maps = eager_pair_attentions(reference, ids, mask, dec_ids, dec_mask)
        self.maps = {site: [word_map(a.double().numpy(), *words[site]) for a in layers]
                     for site, layers in maps.items()}

    columns = Case.columns


@pytest.fixture(scope="module", params=[("bart", "eager"), ("t5", "sdpa"), ("bart", "fused")],
                ids=["bart-eager", "t5-sdpa", "bart-fused"])
def pair_case(request, tokenizer):
    return PairCase(*request.param, tokenizer)


@pytest.mark.parametrize("site", SITES, ids=["encoder-self", "decoder-self", "decoder-cross"])
@pytest.mark.parametrize("i", range(len(WORD_SPECS) - 1), ids=[recipe_id(s) for s in WORD_SPECS[:-1]])
def test_pair_word_recipe_equals_reference(pair_case, site, i):
    spec = WORD_SPECS[i]
    if spec["name"] == "rollout" and site == ("decoder", "cross"):
        assert not [o for o in pair_case.outputs if o.recipe == i and o.site == site]
        return
    check(spec, pair_case.columns(i, site), pair_case.maps[site], pair_case.masks[site])


# --- which tokens form a word ------------------------------------------------------------------------

def test_word_ids_and_a_window_starting_mid_word(tokenizer):
    text = "The animal didn't cross the unbelievably long street."
    windows = tokenize(tokenizer, [text], max_length=12, stride=2)
    first, second = windows
    pieces = tokenizer.convert_ids_to_tokens(first.input_ids)
    assert pieces[:7] == ["[CLS]", "the", "animal", "didn", "'", "t", "cross"]
    assert first.words == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 9]  # BERT's pre-tokenizer splits at the apostrophe
    # The second window starts inside "unbelievably": its partial word is word 1 of that window.
    assert tokenizer.convert_ids_to_tokens(second.input_ids)[:6] == ["[CLS]", "##bel", "##ie", "##va", "##bly", "long"]
    assert second.words == [0, 1, 1, 1, 1, 2, 3, 4, 5]
    for w in windows:
        assert sorted(set(w.words)) == list(range(max(w.words) + 1))
        assert all(b - a in (0, 1) for a, b in zip(w.words, w.words[1:]))


def test_offsets_rule_when_the_tokenizer_has_no_word_ids(tokenizer):
    text = "It didn't rain, well-known."
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    special = [bool(s) for s in enc["special_tokens_mask"]]
    words = window_words(tokenizer, None, enc["input_ids"], offsets, special)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    grouped = {}
    for piece, w in zip(pieces, words):
        grouped.setdefault(w, []).append(piece)
    assert list(grouped.values()) == [["[CLS]"], ["it"], ["didn", "'", "t"], ["rain"], [","],
                                      ["well", "-", "known"], ["."], ["[SEP]"]]
    assert words == offset_words(pieces, [s for s, _ in offsets], [e for _, e in offsets], special)


# --- parameters, labels, fingerprints ----------------------------------------------------------------

def test_level_enters_params_label_and_fingerprint(tmp_path):
    token = validate_recipe({"name": "topk", "k": 8, "per_head": False}, "t")
    word = validate_recipe({"name": "topk", "k": 8, "per_head": False, "level": "word"}, "t")
    assert recipe_params(token) == '{"k":8,"per_head":false}'  # token level: as before the parameter
    assert json.loads(recipe_params(word)) == {"k": 8, "per_head": False, "level": "word"}
    assert recipe_label("topk", json.loads(recipe_params(word))) == "topk_k8_mean_word"
    assert recipe_label("head_stats", {"level": "word"}) == "head_stats_word"
    assert validate_recipe({"name": "topk", "level": "token"}, "t") == validate_recipe({"name": "topk"}, "t")
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n")
    prints = []
    for level in ("token", "word"):
        folder = tmp_path / level
        folder.mkdir()
        job = write_job(folder, corpus, recipes=f'[[recipes]]\nname = "topk"\nlevel = "{level}"\n')
        prints.append(load_job(job).fingerprint())
    assert prints[0] != prints[1]


def test_bad_level_is_one_line(tmp_path):
    from attnpipe.errors import RecipeError

    with pytest.raises(RecipeError, match=r"recipes\[0\] \(topk\): 'level': Input should be 'token' or 'word' "
                                          r"\(got 'words'\)"):
        validate_recipe({"name": "topk", "level": "words"}, "recipes[0]")


# --- a real run: the words table and word-level edges through attnpipe query -------------------------

CORPUS = {
    "d-anim": "The animal didn't cross the street because it was too tired.",
    "d-long": " ".join(["Unbelievably, glass was expensive; well-known windows let out precious heat."] * 6),
    "d-hi": "Hi.",
}
RECIPES = """
[[recipes]]
name = "topk"
k = 3
per_head = false
level = "word"
[[recipes]]
name = "topk"
k = 3
per_head = false
[[recipes]]
name = "head_stats"
level = "word"
"""


@pytest.fixture(scope="module")
def word_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("words")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in CORPUS.items()))
    job = write_job(folder, corpus, tiny_model_dir("bert"), recipes=RECIPES, extra='id_column = "id"',
                    device="cpu")
    run_job(load_job(job), quiet=True)
    return folder / "out"


def test_words_table_matches_the_text_spans(word_run):
    ds = open_dataset(word_run)
    words, tokens = ds.to_pandas("words"), ds.to_pandas("tokens")
    assert (tokens.groupby(["doc_id", "window_index"]).size() > 0).all()
    assert tokens["window_index"].max() >= 1, "the long document must overflow into several windows"
    for row in words.itertuples():
        assert row.text == CORPUS[row.doc_id][row.char_start:row.char_end]
    for (doc, window), toks in tokens.groupby(["doc_id", "window_index"]):
        toks = toks.sort_values("position")
        ws = words[(words.doc_id == doc) & (words.window_index == window)].sort_values("word_index")
        assert ws["word_index"].tolist() == list(range(len(ws)))
        assert toks["word_index"].max() + 1 == len(ws)
        for w in ws.itertuples():
            pieces = toks[toks.word_index == w.word_index]
            assert pieces["position"].tolist() == list(range(w.first_position, w.last_position + 1))
            assert w.special == bool(pieces["special"].all())
            if not w.special:
                assert (w.char_start, w.char_end) == (pieces["char_start"].min(), pieces["char_end"].max())
    anim = words[words.doc_id == "d-anim"].sort_values("word_index")["text"].tolist()
    assert anim[:4] == ["", "The", "animal", "didn"] and anim[-2:] == [".", ""]


def test_query_joins_word_edges_to_words(word_run):
    ds = open_dataset(word_run)
    assert {"words", "edges_words", "topk_k3_mean_word", "head_stats_word", "topk_k3_mean"} <= set(
        ds.sql("SHOW TABLES")["name"])
    sql = ("SELECT e.layer, e.query_pos, q.text AS query, e.key_pos, k.text AS key, e.weight "
           "FROM topk_k3_mean_word e "
           "JOIN words q ON q.doc_id = e.doc_id AND q.window_index = e.window_index AND q.word_index = e.query_pos "
           "JOIN words k ON k.doc_id = e.doc_id AND k.window_index = e.window_index AND k.word_index = e.key_pos "
           "WHERE e.doc_id = 'd-anim' AND q.text = 'animal' ORDER BY e.layer, e.weight DESC")
    joined = ds.sql(sql)
    assert len(joined) == 2 * 3  # two layers, three key words each
    assert set(joined["query_pos"]) == {2}
    result = invoke("query", word_run, sql, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].replace('"', "") == "layer,query_pos,query,key_pos,key,weight"
    assert len(result.output.splitlines()) == 7
    # The view does the same join; token views leave word-level rows out.
    view = ds.sql("SELECT * FROM edges_words")
    assert len(view) == len(ds.sql("SELECT * FROM topk_k3_mean_word"))
    assert (view["recipe_label"] == "topk_k3_mean_word").all()
    assert set(ds.sql("SELECT DISTINCT recipe_label FROM edges_tokens")["recipe_label"]) == {"topk_k3_mean"}
    stats = ds.sql("SELECT window_tokens, n FROM head_stats_word h JOIN (SELECT doc_id, window_index, count(*) AS n "
                   "FROM words GROUP BY ALL) USING (doc_id, window_index)")
    assert (stats["window_tokens"] == stats["n"]).all()  # at word level it counts the window's words


def test_token_plots_and_the_head_view_leave_word_rows_out(word_run):
    """Matrices and the report's head view are labelled with tokens: word-level rows stay out."""
    from attnpipe.read.matrices import _rows
    from attnpipe.read.report import _views

    ds = open_dataset(word_run)
    edges = _rows(ds, "edges", {"doc_id": "d-anim"}, 1)
    assert len(edges) and not edges["recipe_params"].str.contains("word").any()
    n = int(ds.sql("SELECT count(*) AS n FROM tokens WHERE doc_id = 'd-anim'")["n"][0])
    views = _views(ds, "d-anim", {"source": n})[0]
    assert views and all("word" not in v["source"] for v in views.values())
