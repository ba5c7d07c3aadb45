"""Token groups and the groups recipe: marks stripped from the text, words, files, regexes and
marked spans mapped to tokens through character offsets, and the attention mass between groups
against a plain computation on HF eager maps (BERT, GPT-2, Llama-GQA, padding in the batch, 1e-5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnpipe.errors import CorpusError, JobError
from attnpipe.groups import GroupSpec, compile_groups, strip_marks, token_groups
from attnpipe.recipes import validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.windows import collate, tokenize
from conftest import eager_attentions, loaded, raises_one_line

TEXTS = ["[The developer] argued with the designer because [he] did not like the design.",
         "[The nurse] helped the janitor because [she] was kind.",
         "Nobody here."]


def test_strip_marks():
    text, spans = strip_marks("1 [The developer] argued because [he] left.", "row 0")
    assert text == "1 The developer argued because he left."
    assert [text[a:b] for a, b in spans] == ["The developer", "he"]
    assert "nested" in raises_one_line(CorpusError, strip_marks, "[a [b]]", "row 3")
    assert "without its '['" in raises_one_line(CorpusError, strip_marks, "a] b", "row 4")
    assert "never closed" in raises_one_line(CorpusError, strip_marks, "[a b", "row 5")


def test_groups_match_words_files_regex_and_marks(tmp_path):
    (tmp_path / "jobs.txt").write_text("developer\ndesigner\nnurse\njanitor\n")
    groups = compile_groups([GroupSpec(name="pronoun", words=["he", "she"]),
                             GroupSpec(name="occupation", words_files=["jobs.txt"]),
                             GroupSpec(name="referent", words_files=["jobs.txt"], only_marked=True),
                             GroupSpec(name="mentions", marked=True),
                             GroupSpec(name="because", regex=r"becau\w+")], tmp_path)
    text, marks = strip_marks(TEXTS[0], "row 0")
    spans = {g.name: [text[a:b] for a, b in g.spans(text, marks)] for g in groups}
    assert spans == {"pronoun": ["he"], "occupation": ["developer", "designer"], "referent": ["developer"],
                     "mentions": ["The developer", "he"], "because": ["because"]}
    # whole words only: "he" is not found inside "the"
    other = "the theme, He"
    assert [other[a:b] for a, b in groups[0].spans(other, [])] == ["He"]


def test_bad_groups_are_one_line(tmp_path):
    assert "cannot be read" in raises_one_line(JobError, compile_groups, [GroupSpec(name="x", words_files=["no.txt"])], tmp_path)
    assert "not a valid regular" in raises_one_line(JobError, compile_groups, [GroupSpec(name="x", regex="(")], tmp_path)
    assert "used twice" in raises_one_line(JobError, compile_groups, [GroupSpec(name="x", words=["a"]),
                                                                      GroupSpec(name="x", words=["b"])], tmp_path)
    with pytest.raises(ValueError, match="needs words"):
        GroupSpec(name="x")


def test_token_groups_by_offsets():
    offsets = [(0, 0), (0, 3), (4, 9), (9, 13), (14, 16), (0, 0)]  # [CLS] The devel oper he [SEP]
    special = [True, False, False, False, False, True]
    assert token_groups(offsets, special, [[(4, 13)], [(14, 16)]]) == [
        [False, False, True, True, False, False], [False, False, False, False, True, False]]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_group_mass_equals_plain_computation(arch, tokenizer):
    lm, reference = loaded(arch, tokenizer)
    groups = compile_groups([GroupSpec(name="pronoun", words=["he", "she"]),
                             GroupSpec(name="referent", marked=True)], Path("."))
    cleaned = [strip_marks(t, "t") for t in TEXTS]
    windows = tokenize(tokenizer, [t for t, _ in cleaned], max_length=32, stride=4)
    for w in windows:
        text, marks = cleaned[w.doc_index]
        w.groups = token_groups(w.offsets, w.special, [g.spans(text, marks) for g in groups])
    specs = [validate_recipe({"name": "groups"}, "t"), validate_recipe({"name": "groups", "per_head": False}, "t")]
    outputs = reduce_batch(lm, windows, specs)
    ids, mask = collate(windows, lm.pad_id)
    maps = eager_attentions(reference, ids, mask)
    checked = 0
    for out in outputs:
        cols = out.columns
        for row in range(len(cols["mass"])):
            w = windows[cols["batch_index"][row]]
            p = maps[out.layer][cols["batch_index"][row]].double()  # (head, q, k)
            p = p.mean(0, keepdim=True) if cols["head"][row] == -1 else p[cols["head"][row]][None]
            src = np.flatnonzero(w.groups[cols["from_group"][row]])
            dst = np.flatnonzero(w.groups[cols["to_group"][row]])
            want = p[0][src][:, dst].sum(-1).mean().item()
            assert abs(cols["mass"][row] - want) < 1e-5
            assert cols["from_tokens"][row] == len(src) and cols["to_tokens"][row] == len(dst)
            checked += 1
    # Two groups present in the first two windows: 4 ordered pairs x heads (and the mean), per layer.
    heads = lm.num_heads
    assert checked == 2 * 4 * (heads + 1) * lm.num_layers
