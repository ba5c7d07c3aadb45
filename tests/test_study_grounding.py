"""`attnpipe study grounding` (pipeline/studies) on synthetic tables where the answer is known:
one head's lookback ratio separates grounded from ungrounded spans, or nothing does.

Most tests give the study synthetic DataFrames of the tables' columns in place of its one
reading function (`read_tables`); the last ones run the command on a real generate run of a tiny
random GPT-2 (whose numbers mean nothing: they check the reading, the spans and the files).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import invoke, one_line_error, raises_one_line

from attnpipe.errors import ReadError
from attnpipe.studies import detector as det
from attnpipe.studies import grounding
from attnpipe.studies.grounding import StudyOptions, study
from attnpipe.studies.labels import char_span_steps
from attnpipe.studies.steps import Tables, step_arrays

SIGNAL = (1, 2)  # the head whose lookback ratio says grounded or not: L1H2


def synthetic(path, docs: int = 40, steps: int = 12, layers: int = 3, heads: int = 4, signal: bool = True,
              seed: int = 0) -> tuple[Tables, pd.DataFrame]:
    """A dataset's three tables and span labels. Each generation has two spans (its first and
    second half), each grounded or not at random; with `signal`, head L1H2's lookback ratio is
    0.75 on grounded steps and 0.35 on the others (plus noise), every other ratio is noise."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"d{i:03d}" for i in range(docs)])
    half = steps // 2
    span_labels = rng.integers(0, 2, size=(docs, 2))  # grounded (1) or not, of each half
    labels = pd.DataFrame([(ids[d], int(span_labels[d, k]), k * half, half + k * (steps - half))
                           for d in range(docs) for k in (0, 1)], columns=["doc_id", "label", "step_start", "step_end"])
    d, s, layer, head = (a.ravel() for a in np.meshgrid(np.arange(docs), np.arange(steps), np.arange(layers),
                                                          np.arange(heads), indexing="ij"))
    ratio = rng.uniform(0.2, 0.9, len(d))
    if signal:
        grounded = span_labels[d, (s >= half).astype(int)]
        at = (layer == SIGNAL[0]) & (head == SIGNAL[1])
        ratio[at] = np.where(grounded[at] == 1, 0.75, 0.35) + rng.normal(0, 0.1, at.sum())
    # doc_id categorical, as read_tables reads it (one string per generation)
    grounding_table = pd.DataFrame({"doc_id": pd.Categorical(ids[d]), "step": s, "layer": layer, "stack": "decoder",
                                    "attention": "self", "head": head, "lookback_ratio": ratio,
                                    "self_mass": rng.uniform(0.01, 0.5, len(d))})
    gd, gs = (a.ravel() for a in np.meshgrid(np.arange(docs), np.arange(steps), indexing="ij"))
    generations = pd.DataFrame({"doc_id": ids[gd], "step": gs, "char_start": gs * 4, "char_end": gs * 4 + 3,
                                "logprob": rng.normal(-2, 1, len(gd)), "entropy": rng.uniform(0, 3, len(gd))})
    texts = pd.Series({i: " ".join(["abc"] * steps) for i in ids})
    provenance = {"model": "synthetic", "num_layers": layers, "num_heads": heads}
    return Tables(grounding_table, generations, texts, provenance, str(path)), labels


@pytest.fixture
def known(tmp_path):
    tables, labels = synthetic(tmp_path / "ds")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    return tables, tmp_path / "labels.csv"


# --- the answer is known --------------------------------------------------------------------

def test_the_separating_head_is_found(known):
    tables, labels = known
    result = study(tables.path, labels, tables=tables)
    auroc = result.metrics["detector"]
    assert auroc["auroc"] > 0.97 and auroc["ci95"][0] > 0.9
    top = result.metrics["top_heads"][0]
    assert top["feature"] == "L1H2" and top["coef"] < 0  # a higher ratio: grounded
    assert abs(top["coef"]) > 5 * abs(result.metrics["top_heads"][1]["coef"])
    # The paper's label-free baseline sees the same head among 12, diluted.
    assert result.metrics["unsupervised"]["lookback_mean"]["auroc"] > 0.7


def test_noise_gives_chance(tmp_path):
    tables, labels = synthetic(tmp_path / "ds", docs=60, signal=False, seed=1)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    result = study(tables.path, tmp_path / "labels.csv", tables=tables)
    auroc = result.metrics["detector"]
    assert 0.3 < auroc["auroc"] < 0.7
    assert auroc["ci95"][0] < 0.5 < auroc["ci95"][1]


def test_runs_are_reproducible(known):
    tables, labels = known
    a, b = (study(tables.path, labels, tables=tables, options=StudyOptions(seed=3)) for _ in range(2))
    assert a.metrics == b.metrics
    np.testing.assert_array_equal(a.units["score"], b.units["score"])


def test_span_means_are_means_over_steps(known):
    """Features and label-free scores against a direct computation (means, not sums)."""
    tables, _ = known
    arrays = step_arrays(tables)
    units = pd.DataFrame({"doc_id": ["d003", "d010"], "step_start": [2, 0], "step_end": [7, 12]})
    feats = grounding.unit_features(arrays, units)
    scores = grounding.with_scores(arrays, units)
    g, gen = tables.grounding, tables.generations
    for i, u in units.iterrows():
        rows = g[(g.doc_id == u.doc_id) & (g.step >= u.step_start) & (g.step < u.step_end)]
        per_head = rows.groupby(["layer", "head"])["lookback_ratio"].mean().to_numpy()
        np.testing.assert_allclose(feats[i], per_head, rtol=1e-12)
        assert scores.lookback_mean[i] == pytest.approx(rows.lookback_ratio.mean(), rel=1e-12)
        assert scores.attn_logdiag[i] == pytest.approx(np.log(rows.self_mass).mean(), rel=1e-12)
        steps = gen[(gen.doc_id == u.doc_id) & (gen.step >= u.step_start) & (gen.step < u.step_end)]
        assert scores.logprob_mean[i] == pytest.approx(steps.logprob.mean(), rel=1e-12)
        assert scores.entropy_mean[i] == pytest.approx(steps.entropy.mean(), rel=1e-12)


def test_null_ratios_are_left_out_of_the_mean(known):
    tables, _ = known
    g = tables.grounding
    at = (g.doc_id == "d000") & (g.layer == 0) & (g["head"] == 0)
    g.loc[at & (g.step == 1), "lookback_ratio"] = np.nan
    g.loc[at & (g.step == 2), "lookback_ratio"] = np.nan
    arrays = step_arrays(tables)
    units = pd.DataFrame({"doc_id": ["d000", "d000"], "step_start": [0, 1], "step_end": [4, 3]})
    feats = grounding.unit_features(arrays, units)
    kept = g[at & g.step.isin([0, 3])].lookback_ratio.mean()
    assert feats[0, 0] == pytest.approx(kept) and np.isnan(feats[1, 0])


def test_auroc_matches_scikit_learn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.integers(0, 10, 200).astype(float)  # many ties
    w = rng.integers(0, 4, size=(3, 200)).astype(float)
    assert det.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    for row, got in zip(w, det.auroc(y, s, w)):
        assert got == pytest.approx(roc_auc_score(y, s, sample_weight=row), abs=1e-12)
    assert np.isnan(det.auroc(np.ones(5), np.arange(5.0)))


# --- spans, detectors, labels ---------------------------------------------------------------

def test_char_ranges_map_to_the_steps_whose_tokens_overlap_them():
    # "The cat sat." as tokens: "The" [0,3), " cat" [3,7), "" [7,7) (a byte completed later), " sat" [7,11),
    # "." [11,12), "</s>" [12,12) (the stop token, no characters)
    start, end = np.array([0, 3, 7, 7, 11, 12]), np.array([3, 7, 7, 11, 12, 12])
    assert char_span_steps(start, end, 4, 7) == (1, 2)  # "cat"
    assert char_span_steps(start, end, 2, 5) == (0, 2)  # "e c": two tokens
    assert char_span_steps(start, end, 4, 9) == (1, 4)  # "cat s": the empty token between counts
    assert char_span_steps(start, end, 0, 12) == (0, 5)  # the stop token overlaps nothing
    assert char_span_steps(start, end, 7, 7) is None


def test_char_spans_in_a_labels_file(known, tmp_path):
    tables, _ = known  # tokens "abc" at characters [4s, 4s + 3), separated by spaces
    path = tmp_path / "chars.jsonl"
    path.write_text('{"doc_id": "d001", "label": "grounded", "char_start": 5, "char_end": 10}\n'
                    '{"doc_id": "d002", "label": false, "char_start": 3, "char_end": 5}\n'
                    '\n'
                    '{"doc_id": "d003", "label": 1, "note": "the whole generation"}\n')
    from attnpipe.studies.labels import read_labels, resolve_spans

    arrays = step_arrays(tables)
    units = resolve_spans(path, read_labels(path), arrays.docs, tables.generations, tables.texts, tables.path)
    assert units[["step_start", "step_end", "grounded"]].values.tolist() == [[1, 3, 1], [1, 2, 0], [0, 12, 1]]
    assert units.char_start.tolist()[:2] == [5, 3] and pd.isna(units.char_start[2])
    assert units.source.tolist() == ["line 1", "line 2", "line 4"]


def test_detector_round_trip_scores_identically(known, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tables, labels = known
    result = study(tables.path, labels, tables=tables)
    path = tmp_path / "detector.json"
    result.detector.save(path)
    loaded = det.Detector.load(path)
    arrays = step_arrays(tables)
    x = grounding.unit_features(arrays, result.units)
    np.testing.assert_array_equal(loaded.score(x), result.detector.score(x))
    # ... and as scikit-learn scores the model it fitted
    y = result.units["ungrounded"].to_numpy()
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x), y)
    np.testing.assert_allclose(loaded.score(x), model.predict_proba(scaler.transform(x))[:, 1], atol=1e-9)
    assert json.loads(path.read_text())["trained_on"]["num_heads"] == 4


BAD_LABELS = [
    ("doc_id,label\nd001,maybe\n", "line 2: label 'maybe'"),
    ("doc_id,label\nnope,1\n", "line 2: doc_id 'nope'"),
    ("doc_id,label,step_start,step_end\nd001,1,4,13\n", "line 2: span step_start=4, step_end=13"),
    ("doc_id,label,step_start,step_end\nd001,1,5,5\n", "line 2: span step_start=5, step_end=5"),
    ("doc_id,label,step_start,step_end\nd001,1,a,5\n", "line 2: step_start 'a'"),
    ("doc_id,label,step_start,step_end\nd001,1,1,\n", "line 2: step_end is empty"),
    ("doc_id,label,step_start,step_end,char_start,char_end\nd001,1,0,2,0,3\n", "line 2: gives both"),
    ("doc_id,label,char_start,char_end\nd001,1,3,4\n", "characters 3:4 of 'd001' overlap no generated token"),
    ("doc_id,label,char_start,char_end\nd001,1,40,60\n", "line 2: span char_start=40, char_end=60"),
    ("doc_id,grounded\nd001,1\n", "no column 'label'"),
    ("doc_id,label,step_start\nd001,1,0\n", "column 'step_start' without 'step_end'"),
    ("doc_id,label\nd001,1,3\n", "line 2: 3 fields, the header has 2"),
    ("doc_id,label\n", "has no rows"),
]


@pytest.mark.parametrize("content,expected", BAD_LABELS, ids=[e for _, e in BAD_LABELS])
def test_bad_labels_are_one_line(known, tmp_path, content, expected):
    tables, _ = known
    path = tmp_path / "bad.csv"
    path.write_text(content)
    message = raises_one_line(ReadError, study, tables.path, path, tables=tables)
    assert expected in message and str(path) in message


@pytest.mark.parametrize("name,content,expected", [
    ("bad.jsonl", '{"doc_id": "d001", "label": 1}\n[1, 2]\n', "line 2: not a JSON object"),
    ("bad.jsonl", '{"doc_id": "d001", "label": 1}\n{"doc_id": \n', "line 2: not JSON"),
    ("bad.jsonl", '{"doc_id": "d001", "label": 2}\n', "line 1: label '2'"),
    ("bad.txt", "doc_id,label\n", "cannot tell its format"),
])
def test_bad_json_labels_are_one_line(known, tmp_path, name, content, expected):
    tables, _ = known
    (tmp_path / name).write_text(content)
    assert expected in raises_one_line(ReadError, study, tables.path, tmp_path / name, tables=tables)


def test_too_few_labels_are_refused(known, tmp_path):
    tables, labels = known
    few = pd.read_csv(labels)
    few = pd.concat([few[few.label == 1], few[few.label == 0].drop_duplicates("doc_id").head(3)])
    few.to_csv(tmp_path / "few.csv", index=False)
    message = raises_one_line(ReadError, study, tables.path, tmp_path / "few.csv", tables=tables)
    assert "3 ungrounded spans in 3 generations" in message and "--folds" in message


def test_a_detector_of_another_shape_is_refused(known, tmp_path):
    tables, labels = known
    study(tables.path, labels, tables=tables).detector.save(tmp_path / "d.json")
    other, _ = synthetic(tmp_path / "other", layers=2, heads=4)
    message = raises_one_line(ReadError, study, other.path, None, tmp_path / "d.json", tables=other)
    assert "3 layers x 4 heads" in message and "2 layers x 4 heads" in message
    other.provenance.clear()  # no shape recorded: the heads themselves are compared
    assert "uses head L2H0" in raises_one_line(ReadError, study, other.path, None, tmp_path / "d.json", tables=other)
    same, _ = synthetic(tmp_path / "same", seed=2)
    same.provenance["model"] = "another"  # the same shape: applied, with a note
    notes = study(same.path, None, tmp_path / "d.json", tables=same).notes
    assert notes == ["the detector was trained on 'synthetic', applied here to 'another'"]


def test_without_scikit_learn_training_is_one_line(known, monkeypatch):
    tables, labels = known
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    assert "pip install 'attnpipe[study]'" in raises_one_line(ReadError, study, tables.path, labels, tables=tables)


# --- the command --------------------------------------------------------------------------------

@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """Two synthetic datasets (train: a separating head; other: new generations of the same
    model), read by the CLI through the patched reading function."""
    made = {}
    for name, seed in (("train", 0), ("other", 5)):
        made[name], labels = synthetic(tmp_path / name, seed=seed)
        (tmp_path / name).mkdir()
        labels.to_csv(tmp_path / f"{name}-labels.csv", index=False)
    monkeypatch.setattr(grounding, "read_tables", lambda path: made[str(path).rstrip("/").rsplit("/", 1)[-1]])
    return tmp_path


def test_cli_trains_then_applies_a_detector(datasets):
    train, other = datasets / "train", datasets / "other"
    result = invoke("study", "grounding", train, "--labels", datasets / "train-labels.csv", "--bootstrap", 200)
    assert result.exit_code == 0, result.output
    out = train / "_studies" / "grounding-train"
    assert "detector AUROC 1.000" in result.output and "L1H2" in result.output and str(out) in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["top_heads"][0]["feature"] == "L1H2" and summary["mode"] == "train"
    assert set(summary["files"]) <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 80 and {"score", "grounded", "attn_logdiag"} <= set(scores.columns)

    # the saved detector on the other run: whole generations, then its labelled spans with AUROC
    result = invoke("study", "grounding", other, "--detector", out / "detector.json")
    assert result.exit_code == 0, result.output
    applied = pd.read_parquet(other / "_studies" / "grounding-apply" / "scores.parquet")
    assert len(applied) == 40 and applied["score"].between(0, 1).all()
    result = invoke("study", "grounding", other, "--detector", out / "detector.json",
                    "--labels", datasets / "other-labels.csv", "--out", datasets / "elsewhere")
    assert result.exit_code == 0, result.output
    metrics = json.loads((datasets / "elsewhere" / "summary.json").read_text())["metrics"]
    assert metrics["detector"]["auroc"] > 0.97 and metrics["detector"]["scores"] == "saved detector"


def test_cli_without_labels_writes_label_free_scores(datasets):
    result = invoke("study", "grounding", datasets / "train")
    assert result.exit_code == 0, result.output
    out = datasets / "train" / "_studies" / "grounding-scores"
    generations = pd.read_parquet(out / "generation_scores.parquet")
    assert len(generations) == 40 and generations["lookback_mean"].notna().all()
    assert not (out / "detector.json").exists()


def test_cli_refuses_other_places_inside_the_dataset(datasets):
    train = datasets / "train"
    (train / "_commits").mkdir()
    line = one_line_error(invoke("study", "grounding", train, "--out", train / "_commits"))
    assert "inside the dataset folder" in line
    assert not list((train / "_commits").iterdir())


def test_cli_bad_labels_are_one_line(datasets, tmp_path):
    (tmp_path / "bad.csv").write_text("doc_id,label\nd001,yes\n")
    line = one_line_error(invoke("study", "grounding", datasets / "train", "--labels", tmp_path / "bad.csv"))
    assert "bad.csv line 2: label 'yes'" in line
    assert not (datasets / "train" / "_studies").exists()


def test_a_dataset_without_generations_is_one_line(data):
    line = one_line_error(invoke("study", "grounding", data["dense"]))
    assert "has no generations table" in line and "generate run" in line
    assert not (data["dense"] / "_studies").exists()


def test_results_inside_a_dataset_leave_it_whole(data, tmp_path, monkeypatch):
    """The default folder, OUT/_studies/..., inside a real dataset: verify, status and
    open_dataset read the dataset as before."""
    from attnpipe.read import open_dataset

    real = tmp_path / "real"
    shutil.copytree(data["dense"], real)
    tables, labels = synthetic(real)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    monkeypatch.setattr(grounding, "read_tables", lambda path: tables)
    assert invoke("study", "grounding", real, "--labels", tmp_path / "labels.csv", "--bootstrap", 100).exit_code == 0
    assert (real / "_studies" / "grounding-train" / "detector.json").is_file()
    verified = invoke("verify", real)
    assert verified.exit_code == 0 and "0 damaged, 0 stray" in verified.output, verified.output
    assert invoke("status", real).exit_code == 0
    with open_dataset(real) as ds:
        assert len(ds.to_pandas("documents")) and "_studies" not in ds.tables


# --- a real generate run ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory, tokenizer):
    """A generate run of a tiny random GPT-2 on 12 context + question prompts, 6 new tokens each."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    base = tmp_path_factory.mktemp("generated")
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=None,
                        eos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(base / "lm")
    tokenizer.save_pretrained(base / "lm")
    rows = [{"id": f"q{i}", "question": f"What is item {i}?", "context": f"Item {i} is a box by the door."}
            for i in range(12)]
    (base / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus, model, out = base / "qa.jsonl", base / "lm", base / "out"
    (base / "job.toml").write_text(
        f'name = "gen"\n[corpus]\npath = "{corpus}"\ntext_column = "question"\ncontext_column = "context"\n'
        f'id_column = "id"\n[model]\nname = "{model}"\n[run]\noutput = "{out}"\nprogress = false\n'
        'weight_dtype = "float32"\n[generate]\ntemplate = "Context: {context}\\nQuestion: {text}\\nAnswer:"\n'
        'max_new_tokens = 6\n[[recipes]]\nname = "head_stats"\n')
    result = invoke("run", base / "job.toml")
    assert result.exit_code == 0, result.output
    return base


def test_real_generate_run_end_to_end(generated):
    """Train on character spans of the real tables, apply the detector, and the dataset still
    verifies with the results inside it."""
    from attnpipe.read import open_dataset

    out = generated / "out"
    with open_dataset(out) as ds:
        docs = ds.to_pandas("documents", columns=["doc_id", "generated_text"])
        steps = ds.to_pandas("generations").groupby("doc_id").size()
    rows = ["doc_id,label,char_start,char_end"]
    for i, (doc, text) in enumerate(zip(docs.doc_id, docs.generated_text)):
        cut = len(text) // 2
        rows += [f"{doc},{i % 2},0,{cut}", f"{doc},{1 - i % 2},{cut},{len(text)}"]
    (generated / "labels.csv").write_text("\n".join(rows) + "\n")
    result = invoke("study", "grounding", out, "--labels", generated / "labels.csv", "--folds", 3,
                    "--bootstrap", 100)
    assert result.exit_code == 0, result.output
    assert "12 generations, 72 steps, 8 heads; 24 labelled spans" in result.output
    train = out / "_studies" / "grounding-train"
    spans = pd.read_parquet(train / "scores.parquet")
    assert len(spans) == 24 and spans["score"].between(0, 1).all()
    ends = spans.groupby("doc_id").step_end.max()
    assert (ends.to_numpy() <= steps[ends.index].to_numpy()).all()  # char spans mapped inside the generation
    detector = json.loads((train / "detector.json").read_text())
    assert detector["trained_on"]["num_layers"] == 2 and detector["trained_on"]["num_heads"] == 4
    assert len(detector["features"]) == 8

    result = invoke("study", "grounding", out, "--detector", train / "detector.json")
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out / "_studies" / "grounding-apply" / "generation_scores.parquet")) == 12
    verified = invoke("verify", out)
    assert verified.exit_code == 0 and "0 damaged, 0 stray" in verified.output, verified.output
