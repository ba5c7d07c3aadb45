"""`attnpipe study distill` and `attnpipe export distill` (pipeline/studies/distill.py,
align.py, export_distill.py): on real runs of tiny random-init BERTs (2 layers x 4 heads) with
dense maps and top-k edges, and on hand-made alignments and rows whose answers are computed here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_CONFIGS, invoke, one_line_error, write_job

from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.studies.align import Side, align, pool
from attnpipe.studies.distill import monotone_mapping, uniform_mapping
from attnpipe.studies.export_distill import topk_target

TEXTS = {
    "a": "The animal didn't cross the street because it was too tired.",
    "b": "Why do cats purr?",
    "c": "Rain fell all night; by morning the road was a well-known river.",
    "d": "The mill stood by the river, unhappily.",
}
RECIPES = """
[[recipes]]
name = "dense"
max_tokens = 64
per_head = true
[[recipes]]
name = "topk"
k = 3
per_head = true
"""


def corpus(folder, texts=TEXTS):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()))
    return path


def run(folder, model, texts=TEXTS, recipes=RECIPES):
    job = write_job(folder, corpus(folder, texts), model, recipes=recipes, extra='id_column = "id"',
                    device="cpu", weight_dtype="float32")
    run_job(load_job(job), quiet=True)
    return folder / "out"


def fewer_words_tokenizer(folder, drop=("animal", "street", "river", "morning", "cats")):
    """The MiniLM tokenizer without some whole words in its vocabulary: they split into pieces,
    so the piece boundaries differ from the original's (a second tokenization of one text)."""
    from transformers import BertTokenizerFast

    from attnpipe.model import builtin_model_dir

    vocab = (builtin_model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(v for v in vocab if v not in drop) + "\n", encoding="utf-8")
    return BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)


def peaky_bert(folder, tokenizer, seed=0):
    """conftest's tiny BERT (2 layers x 4 heads) with weights drawn 25 times wider: the default
    init (std 0.02) gives nearly uniform attention, where every model looks like every other."""
    import torch
    from transformers import AutoModel

    config = TINY_CONFIGS["bert"]()
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    AutoModel.from_config(config, attn_implementation="eager").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """teacher: a tiny BERT; same: the same model again; random: another random init of that
    shape; split: the teacher's weights with a tokenizer that splits some words differently;
    other: the teacher over a corpus with one text changed; none: a run with head_stats only."""
    teacher_dir = peaky_bert(tmp_path_factory.mktemp("teacher-model"), tokenizer)
    random_dir = peaky_bert(tmp_path_factory.mktemp("random-model"), tokenizer, seed=1)
    split_dir = peaky_bert(tmp_path_factory.mktemp("split-model"), tokenizer)
    fewer_words_tokenizer(tmp_path_factory.mktemp("vocab")).save_pretrained(split_dir)
    out = {name: run(tmp_path_factory.mktemp(name), model) for name, model in
           (("teacher", teacher_dir), ("same", teacher_dir), ("random", random_dir), ("split", split_dir))}
    out["other"] = run(tmp_path_factory.mktemp("other"), teacher_dir, {**TEXTS, "b": "Why do dogs bark?"})
    out["none"] = run(tmp_path_factory.mktemp("none"), teacher_dir, recipes='[[recipes]]\nname = "head_stats"\n')
    out["model"] = teacher_dir
    return out


def study_files(tmp_path, teacher, student, *extra):
    result = invoke("study", "distill", "--teacher", teacher, "--student", student, "--out", tmp_path / "s", *extra)
    assert result.exit_code == 0, result.output
    return result.output, pd.read_parquet(tmp_path / "s" / "pairs.parquet"), json.loads(
        (tmp_path / "s" / "summary.json").read_text())


# --- the study on real runs -------------------------------------------------------------------

def test_a_model_compared_with_itself_gives_zero(runs, tmp_path):
    out, pairs, summary = study_files(tmp_path, runs["teacher"], runs["same"])
    diagonal = pairs[pairs["teacher_layer"] == pairs["student_layer"]]
    for column in ("kl", "js", "kl_headmean", "js_headmean"):
        assert diagonal[column].abs().max() < 1e-9, column
    off = pairs[pairs["teacher_layer"] != pairs["student_layer"]]
    assert (off["kl"] > 0.01).all()  # two layers of one model differ
    assert summary["mapping"]["best"]["teacher_layers"] == [0, 1]
    assert summary["mapping"]["monotone"]["teacher_layers"] == [0, 1]
    assert summary["source"] == "maps" and summary["aligned"] == 0
    assert summary["edges_error"]["windows"] == 4  # both runs have edges: checked against dense
    heads = pd.read_parquet(tmp_path / "s" / "heads.parquet")
    assert len(heads) == 2 * 2 * 4
    assert "distill study" in out and (tmp_path / "s" / "summary.txt").is_file()


def test_a_random_student_is_clearly_further(runs, tmp_path):
    _, same, _ = study_files(tmp_path / "same", runs["teacher"], runs["same"])
    _, random, _ = study_files(tmp_path / "random", runs["teacher"], runs["random"])
    diagonal = random[random["teacher_layer"] == random["student_layer"]]
    assert (diagonal["kl"] > 0.05).all() and (diagonal["js"] > 0.01).all()
    assert (diagonal["kl"].to_numpy() > 100 * same[same["teacher_layer"] == same["student_layer"]]["kl"].max()).all()


def test_different_tokenizers_are_compared_on_common_spans(runs, tmp_path):
    _, pairs, summary = study_files(tmp_path, runs["teacher"], runs["split"])
    assert summary["aligned"] == 4  # every window: each text has a word the student splits
    windows = pd.read_parquet(tmp_path / "s" / "windows.parquet").set_index("doc_id")
    # "animal" and "street" are one token for the teacher, several for the student
    assert windows.loc["a", "student_tokens"] > windows.loc["a", "teacher_tokens"]
    assert windows.loc["a", "spans"] == windows.loc["a", "teacher_tokens"]
    assert windows["dropped_teacher"].max() < 1e-9 and windows["dropped_student"].max() < 1e-9
    assert np.isfinite(pairs[["kl", "js"]].to_numpy()).all()


def test_edges_only_runs_give_an_approximation(runs, tmp_path):
    sparse = "[[recipes]]" + RECIPES.split("[[recipes]]")[2]
    a = run(tmp_path / "ea", runs["model"], recipes=sparse)
    b = run(tmp_path / "eb", runs["model"], recipes=sparse)
    out, pairs, summary = study_files(tmp_path, a, b)
    assert summary["source"] == "edges" and "approximation" in out
    assert pairs[pairs["teacher_layer"] == pairs["student_layer"]]["kl"].abs().max() < 1e-9


# --- alignment on hand-made tokenizations ----------------------------------------------------

TEXT = "unhappiness is real"  # characters: unhappiness 0-11, is 12-14, real 15-19


def test_alignment_of_two_tokenizations():
    # A: [CLS] un ##happi ##ness is real [SEP]; B: <s> unhap piness Ġis Ġreal </s> (B's pieces carry the space)
    a = Side.of([0, 0, 2, 7, 12, 15, 0], [0, 2, 7, 11, 14, 19, 0], [1, 0, 0, 0, 0, 0, 1])
    b = Side.of([0, 0, 5, 11, 14, 0], [0, 5, 11, 14, 19, 0], [1, 0, 0, 0, 0, 1])
    al = align(a, b)
    assert al.bounds.tolist() == [[-1, -1], [0, 11], [11, 14], [14, 19], [-2, -2]]
    assert al.span_a.tolist() == [0, 1, 1, 1, 2, 3, 4]
    assert al.span_b.tolist() == [0, 1, 1, 2, 3, 4]
    assert align(a, a).identity and not al.identity


def test_a_token_only_one_side_has_is_left_out():
    # A: un happy \n day; B: unhappy day (B drops the newline)
    a = Side.of([0, 2, 7, 8], [2, 7, 8, 11], [0, 0, 0, 0])
    b = Side.of([0, 8], [7, 11], [0, 0])
    al = align(a, b)
    assert al.span_a.tolist() == [0, 0, -1, 1] and al.span_b.tolist() == [0, 1]
    assert al.bounds.tolist() == [[0, 7], [8, 11]]


def test_pooling_sums_keys_and_averages_queries():
    a = Side.of([0, 2, 7, 8], [2, 7, 8, 11], [0, 0, 0, 0])
    al = align(a, Side.of([0, 8], [7, 11], [0, 0]))
    m = np.array([[0.1, 0.2, 0.3, 0.4],
                  [0.4, 0.4, 0.1, 0.1],
                  [0.25, 0.25, 0.25, 0.25],
                  [0.5, 0.0, 0.2, 0.3]])
    pooled, lost = pool(m, al.span_a, al.spans)
    # span 0 = tokens 0, 1: row = mean of rows 0 and 1 over keys {0,1} and {3}; token 2 left out
    row0 = np.array([(0.3 + 0.8) / 2, (0.4 + 0.1) / 2])
    row1 = np.array([0.5, 0.3])
    np.testing.assert_allclose(lost, [1 - row0.sum(), 1 - row1.sum()])
    np.testing.assert_allclose(pooled, [row0 / row0.sum(), row1 / row1.sum()])


# --- layer mappings -----------------------------------------------------------------------------

def test_monotone_mapping_by_hand():
    cost = np.array([[1.0, 0.0, 5.0, 5.0],   # student layer 0: best at teacher 1
                     [5.0, 0.0, 0.5, 5.0],   # student layer 1: best at 1, but 1 is taken
                     [5.0, 5.0, 5.0, 0.0]])
    assert monotone_mapping(cost).tolist() == [1, 2, 3]  # 0 + 0.5 + 0 beats 1 + 0 + 0
    assert monotone_mapping(np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])).tolist() == [0, 0, 1]
    assert uniform_mapping(3, 6).tolist() == [1, 3, 5] and uniform_mapping(4, 12).tolist() == [2, 5, 8, 11]


# --- export -------------------------------------------------------------------------------------

def test_sparse_truncation_error_by_hand():
    p = np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.9, 0.0, 0.0]])
    valid = np.array([[True] * 4, [True, True, False, False]])  # second row: a causal query at position 1
    t = topk_target(p, valid, 2)
    # row 0 keeps 0.5 and 0.3 and spreads 0.2 over two keys: r = [0.5, 0.3, 0.1, 0.1]
    expected = 0.15 * math.log(0.15 / 0.1) + 0.05 * math.log(0.05 / 0.1)
    np.testing.assert_allclose(t["truncation_kl"], [expected, 0.0], atol=1e-12)
    np.testing.assert_allclose(t["leftover"], [0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(t["remainder_entropy_max"], [math.log(2), 0.0])
    assert t["order"][0].tolist() == [0, 1] and t["order"][1].tolist() == [1, 0]


def test_export_loads_with_datasets(runs, tmp_path):
    import datasets

    for fmt in ("dense", "sparse", "sampled"):
        result = invoke("export", "distill", runs["teacher"], "--format", fmt, "--k", "3", "--out", tmp_path / fmt)
        assert result.exit_code == 0, result.output
    dense = datasets.load_dataset("parquet", data_files=str(tmp_path / "dense" / "targets.parquet"), split="train")
    sparse = datasets.load_dataset("parquet", data_files=str(tmp_path / "sparse" / "targets.parquet"), split="train")
    assert len(dense) == len(sparse) > 0
    d, s = dense.to_pandas(), sparse.to_pandas()
    np.testing.assert_allclose(d["probs"].map(sum), 1.0, atol=1e-5)
    # the exported truncation error is the hand definition applied to the dense rows
    row = d.iloc[7]
    p = np.asarray(row["probs"], np.float64)
    keep = np.argsort(-p, kind="stable")[:3]
    r = np.full_like(p, (1 - p[keep].sum()) / (len(p) - 3))
    r[keep] = p[keep]
    assert s.iloc[7]["key_pos"].tolist() == keep.tolist()
    assert s.iloc[7]["truncation_kl"] == pytest.approx(float((p * np.log(p / r)).sum()), rel=1e-4, abs=1e-7)
    heads = pd.read_parquet(tmp_path / "sparse" / "truncation.parquet")
    assert len(heads) == 2 * 4 and (heads["truncation_kl_mean"] >= 0).all()
    sampled = pd.read_parquet(tmp_path / "sampled" / "targets.parquet")
    np.testing.assert_allclose(sampled["weight"].map(sum), 1.0, atol=1e-6)


# --- bad inputs: one line -------------------------------------------------------------------------

def test_bad_inputs_give_one_line(runs, tmp_path):
    def error(*args):
        return one_line_error(invoke(*args, "--out", tmp_path / "x"))

    assert "same corpus" in error("study", "distill", "--teacher", runs["teacher"], "--student", runs["other"])
    assert "no token-level attention rows" in error("study", "distill", "--teacher", runs["none"], "--student",
                                                    runs["teacher"])
    assert "no such folder" in error("study", "distill", "--teacher", tmp_path / "missing", "--student",
                                     runs["teacher"])
    assert "no token-level dense maps" in error("export", "distill", runs["none"])
    assert not (tmp_path / "x").exists()


def test_commands_and_options_have_help():
    import click

    from attnpipe.cli import cli

    for command in (cli.commands["study"].commands["distill"], cli.commands["export"].commands["distill"]):
        assert (command.help or "").strip()
        assert all((p.help or "").strip() for p in command.params if isinstance(p, click.Option))


def test_causal_runs(tmp_path, tiny_model_dir):
    """A decoder's rows hold keys 0..query_pos: compared with itself it gives 0, from maps and
    from edges, and its exported rows have query_pos + 1 keys."""
    model = tiny_model_dir("gpt2")
    a, b = run(tmp_path / "a", model), run(tmp_path / "b", model)
    out, pairs, summary = study_files(tmp_path, a, b)
    assert pairs[pairs["teacher_layer"] == pairs["student_layer"]]["kl"].abs().max() < 1e-9
    edges = pd.read_parquet(tmp_path / "s" / "edges_error.parquet")
    assert edges[edges["teacher_layer"] == edges["student_layer"]]["kl_edges"].abs().max() < 1e-9
    result = invoke("export", "distill", a, "--format", "sparse", "--k", "2", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(tmp_path / "e" / "targets.parquet")
    assert (rows["num_keys"] == rows["query_pos"] + 1).all()
    assert (rows.loc[rows["query_pos"] < 2, "truncation_kl"].abs() < 1e-9).all()  # nothing was cut
