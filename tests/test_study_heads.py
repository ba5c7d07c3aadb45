"""`attnpipe study heads`: the ranking on effects with a known answer, the scan end to end on a
tiny model (each head alone, then the top heads together), one-line errors, and a WinoBias tier
on the real MiniLM (marked `shared`: skipped without ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from attnpipe.errors import ReadError
from attnpipe.read import open_dataset
from attnpipe.studies.heads import rank

from conftest import error_line, invoke, raises_one_line, write_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _effects(rows):
    return pd.DataFrame(rows, columns=["doc_id", "window_index", "label", "keys", "cosine", "logit_diff",
                                       "logit_diff_clean", "kl_mean", "kl_last"])


def test_rank_known_answer():
    """L1.H0 moves the embedding most (mean 1 - cos = 0.3), L0.H1 least; logit_diff by |change|."""
    rows = []
    for doc, (a, b, c) in {"d1": (0.6, 0.9, 1.0), "d2": (0.8, 0.9, 1.0)}.items():
        rows += [(doc, 0, "L1.H0", 1, a, 1.0, 2.0, None, None), (doc, 0, "L0.H0", 1, b, 5.0, 2.0, None, None),
                 (doc, 0, "L0.H1", 0, c, 2.0, 2.0, None, None)]
    ranking = rank(_effects(rows), "cosine")
    t = ranking.table
    assert list(zip(t["layer"], t["head"])) == [(1, 0), (0, 0), (0, 1)]
    assert t["effect"].tolist() == pytest.approx([0.3, 0.1, 0.0])
    assert t["stderr"][0] == pytest.approx(0.1) and t["empty"].tolist() == [0, 0, 2] and ranking.windows == 2
    by_logit = rank(_effects(rows), "logit_diff").table
    assert list(by_logit["layer"]) == [0, 1, 0] and by_logit["effect"].tolist() == [3.0, -1.0, 0.0]
    assert "need [effects] logits = true" in raises_one_line(ReadError, rank, _effects(rows), "kl_mean")


def _job(tmp_path, model_dir, interventions):
    corpus = tmp_path / "docs.jsonl"
    texts = ["The nurse said that she was tired.", "The developer argued with the designer.",
             "A doctor came in and the nurse left.", "Nothing about a nurse here."]
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return write_job(tmp_path, corpus, model_dir, extra='id_column = "id"',
                     recipes='[[recipes]]\nname = "head_stats"\n' + interventions)


def test_scan_end_to_end(tmp_path, tiny_model_dir):
    """Every head of the tiny BERT (2 x 4) alone, then the top 3 together; the ranking's effect
    of a head is the mean of its scan rows, and the combined run uses exactly the top heads."""
    job = _job(tmp_path, tiny_model_dir("bert"),
               '[[interventions]]\nlabel = "zero-nurse"\nop = "zero"\nkeys = { regex = "nurse" }\n')
    out = tmp_path / "study"
    result = invoke("study", "heads", out, "--job", job, "--sample", 3, "--top", 3, "-q")
    assert result.exit_code == 0, result.output
    ranking = pd.read_csv(out / "ranking-cosine.csv")
    assert len(ranking) == 8 and sorted(zip(ranking["layer"], ranking["head"])) == [(l, h) for l in (0, 1)
                                                                                      for h in range(4)]
    scan = open_dataset(out / "scan").to_pandas("effects")
    assert scan["doc_id"].nunique() == 3  # the sample
    mean = (1 - scan[scan["label"] == "L1.H2"]["cosine"]).mean()
    row = ranking[(ranking["layer"] == 1) & (ranking["head"] == 2)]
    assert float(row["effect"].iloc[0]) == pytest.approx(mean, rel=1e-5)
    assert ranking["effect"].is_monotonic_decreasing
    top = open_dataset(out / "top").to_pandas("effects")
    assert set(top["label"]) == {"top3"}
    pairs = [[int(r.layer), int(r.head)] for r in ranking.head(3).itertuples()]
    assert f"layer_heads = [{', '.join(f'[{a}, {b}]' for a, b in pairs)}]" in (out / "top_heads-cosine.toml").read_text()
    assert "the top 3 heads together" in result.output


def test_scan_errors_are_one_line(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir("bert"), '[[interventions]]\nop = "zero"\nkeys = { regex = "nurse" }\n')
    line = error_line(invoke("study", "heads", tmp_path / "s", "--job", job, "--intervention", 3))
    assert "--intervention 3: the job has 1 [[interventions]] (0..0)" in line
    (tmp_path / "plain").mkdir()
    plain = _job(tmp_path / "plain", tiny_model_dir("bert"), "")
    assert "needs one [[interventions]] entry as its template" in error_line(
        invoke("study", "heads", tmp_path / "s", "--job", plain))
    line = error_line(invoke("study", "heads", tmp_path / "s2", "--job", job, "--target", "kl_last", "--sample", 2))
    assert "--target kl_last needs [effects] logits = true in the job" in line
    assert not (tmp_path / "s2").exists()  # refused before any run


@pytest.mark.shared
def test_winobias_heads_on_minilm(tmp_path):
    """Done-when of issue 15: on MiniLM and WinoBias, zeroing the attention to the marked
    occupation in each head alone moves the pooled embedding; the heads are ranked and the top
    heads together move it more than the best single head. No bracket reaches the model."""
    out = tmp_path / "wb"
    result = invoke("study", "heads", out, "--job", JOBS / "winobias-heads.toml", "--sample", 8, "--top", 5, "-q")
    assert result.exit_code == 0, result.output
    ranking = pd.read_csv(out / "ranking-cosine.csv")
    assert len(ranking) == 72 and (ranking["effect"] >= -1e-6).all() and ranking["effect"].iloc[0] > 1e-3
    scan = open_dataset(out / "scan")
    assert (scan.to_pandas("effects")["keys"] >= 1).all()  # every sentence has its marked occupation
    tokens = scan.to_pandas("tokens")
    assert not tokens["token"].isin(["[", "]"]).any()
    together = 1 - open_dataset(out / "top").to_pandas("effects")["cosine"]
    assert together.mean() > ranking["effect"].iloc[0]
