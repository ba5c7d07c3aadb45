"""The bias study: paired differences of group attention mass between two runs, their intervals,
permutation p-values and Benjamini-Hochberg q-values; end to end on pairs written for the tests
(tiny BERT), and on the real WinoBias files when ../shared is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnpipe.studies import bias
from conftest import SHARED, error_line, invoke, write_job

PRO = ["[The developer] argued with the designer because [he] did not like the design.",
       "[The nurse] helped the janitor because [she] was kind.",
       "[The mechanic] gave the clerk a present because [he] won the lottery.",
       "[The secretary] called the guard because [she] was scared.",
       "The driver passed [the hairdresser] because [she] was slow.",
       "[The carpenter] thanked the cashier because [he] got a discount."]
ANTI = [t.replace("[he]", "[HE]").replace("[she]", "[he]").replace("[HE]", "[she]") for t in PRO]
GROUPS = """
[[groups]]
name = "pronoun"
words = ["he", "she"]
only_marked = true
[[groups]]
name = "occupation"
marked = true
regex = "(?!)"
"""
RECIPES = '[[recipes]]\nname = "groups"\n'


def run_pair(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    outs = []
    for name, texts in (("pro", PRO), ("anti", ANTI)):
        folder = tmp_path / name
        folder.mkdir()
        corpus = folder / "c.txt"
        corpus.write_text("".join(f"{i + 1} {t}\n" for i, t in enumerate(texts)))
        job = write_job(folder, corpus, model, recipes=GROUPS + RECIPES,
                        extra='format = "text"\ntext_unit = "line"\nmarks = "brackets"\nstrip = "^\\\\d+ "')
        result = invoke("run", job)
        assert result.exit_code == 0, result.output
        outs.append(folder / "out")
    return outs[0], outs[1]


def test_head_tests_find_the_shifted_head():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 0.05, size=(200, 12))
    d[:, 3] += 0.1
    t = bias.head_tests(d, resamples=1000, seed=1)
    assert t["q"][3] < 0.05 and t["ci_low"][3] < 0.1 < t["ci_high"][3]
    assert (np.delete(t["q"], 3) > 0.05).mean() > 0.8


def test_benjamini_hochberg_by_hand():
    got = bias.benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2]))
    np.testing.assert_allclose(got, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])


def test_study_end_to_end(tmp_path, tiny_model_dir):
    a, b = run_pair(tmp_path, tiny_model_dir("bert"))
    tokens = pd.read_parquet(next((a / "tokens").rglob("*.parquet")))
    words = tokens[~tokens.special].token
    assert "[" not in "".join(words) and not words.str.fullmatch(r"\d+").any()
    result = invoke("study", "bias", "--a", a, "--b", b, "--from", "pronoun", "--to", "occupation",
                    "--resamples", "200")
    assert result.exit_code == 0, result.output
    assert "6 pairs by corpus_row" in result.output
    out = a / "_studies" / "bias-pronoun-occupation"
    heads = pd.read_parquet(out / "heads.parquet")
    assert len(heads) == 2 * 4 and set(heads.columns) >= {"layer", "head", "mean", "ci_low", "ci_high", "p", "q"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 6 and summary["from_group"] == "pronoun"
    # A run compared with itself differs nowhere.
    same = invoke("study", "bias", "--a", a, "--b", a, "--from", "pronoun", "--to", "occupation",
                  "--resamples", "200", "--out", tmp_path / "same")
    assert same.exit_code == 0, same.output
    assert (pd.read_parquet(tmp_path / "same" / "heads.parquet")["mean"] == 0).all()
    assert invoke("verify", a).exit_code == 0


def test_check_reruns_with_top_and_random_heads(tmp_path, tiny_model_dir):
    """--check: both corpora again through their recorded jobs, one intervention per head set; the
    top heads and the random sets are reported, and nothing is left in the runs' folders."""
    a, b = run_pair(tmp_path, tiny_model_dir("bert"))
    before = sorted(p.relative_to(a) for p in a.rglob("*") if "_studies" not in p.parts)
    result = invoke("study", "bias", "--a", a, "--b", b, "--from", "pronoun", "--to", "occupation",
                    "--resamples", "200", "--check", "2", "--random", "3")
    assert result.exit_code == 0, result.output
    assert "check: the top 2 heads" in result.output and "3 random sets of 2 heads" in result.output
    out = a / "_studies" / "bias-pronoun-occupation"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["check"]["heads"]) == 2 and summary["check"]["pairs"] == 6
    assert len(pd.read_parquet(out / "check_random.parquet")) == 3
    assert sorted(p.relative_to(a) for p in a.rglob("*") if "_studies" not in p.parts) == before


def test_study_errors(tmp_path, tiny_model_dir):
    a, b = run_pair(tmp_path, tiny_model_dir("bert"))
    line = error_line(invoke("study", "bias", "--a", a, "--b", b, "--from", "verb", "--to", "occupation"))
    assert "'verb' is not in" in line and "occupation, pronoun" in line
    plain = tmp_path / "plain"
    plain.mkdir()
    corpus = plain / "c.txt"
    corpus.write_text("One text.\n")
    assert invoke("run", write_job(plain, corpus, tiny_model_dir("bert"))).exit_code == 0
    assert "no group_mass table" in error_line(invoke("study", "bias", "--a", plain / "out", "--b", b))


@pytest.mark.parametrize("extra, recipes, expect", [
    ("", RECIPES, "needs [[groups]]"),
    ("", GROUPS, "neither a recipe nor an intervention uses them"),
    ("", GROUPS + RECIPES, "corpus.marks is not set"),
    ('marks = "brackets"\nstrip = "("', GROUPS + RECIPES, "'corpus.strip'"),
])
def test_job_errors(extra, recipes, expect, tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a [b] c\n")
    job = write_job(tmp_path, corpus, tiny_model_dir("bert"), recipes=recipes, extra=extra)
    assert expect in error_line(invoke("run", job))


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "data" / "winobias").is_dir(), reason="../shared/data/winobias is absent")
def test_winobias_pro_anti(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    outs = []
    for kind in ("pro", "anti"):
        out = tmp_path / kind
        result = invoke("run", repo / "jobs" / f"winobias-{kind}.toml", "--limit", "40", "-o", out, "-q")
        assert result.exit_code == 0, result.output
        outs.append(out)
    result = invoke("study", "bias", "--a", outs[0], "--b", outs[1], "--from", "pronoun", "--to", "occupation",
                    "--resamples", "500")
    assert result.exit_code == 0, result.output
    heads = pd.read_parquet(outs[0] / "_studies" / "bias-pronoun-occupation" / "heads.parquet")
    assert len(heads) == 6 * 12 and "40 pairs" in result.output
