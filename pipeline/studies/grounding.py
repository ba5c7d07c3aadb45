"""`attnpipe study grounding`: does a model's attention tell when what it generates is grounded
in the context it was given?

Definitions (Lookback Lens, Chuang et al., EMNLP 2024; means, not sums, as in the paper):

- lookback ratio of head (layer l, head h) at step s: context_mean / (context_mean +
  generated_mean), where context_mean is the step's query's attention on the context tokens
  divided by their number, and generated_mean its attention on the tokens generated so far
  divided by theirs; 1 at step 0, when nothing is generated yet. Read from the grounding table.
- span feature of head (l, h), named L{l}H{h}: the mean of its lookback ratio over the span's
  steps (steps where it is null, context and generated attention both 0, are not counted).
- detector: logistic regression on the standardized span features. The positive class is
  "ungrounded" (a hallucinated span); its score is P(ungrounded).
- evaluation: out-of-fold scores from k-fold cross-validation stratified by label and grouped
  by doc_id (a generation's spans never sit on both sides of a split); their AUROC, with a
  percentile interval from bootstrap samples of whole generations; the heads with the largest
  coefficients of the model fit on every span.

Label-free scores of a span or generation, means over its steps (and layers and heads):

- lookback_mean: the lookback ratio (the paper's baseline); low: little attention on context.
- attn_logdiag: AttnLogDet-style (LLM-Check's attention score, NeurIPS 2024): the mean of
  log(self_mass), the attention of each step's query on itself (the attention map's diagonal
  entry of token s - 1; of the prompt's last token at step 0), clamped at 1e-12.
- logprob_mean: the generated tokens' log-probabilities; low: the model was unsure.
- entropy_mean: the entropy of the next-token distributions (nats); high: the model was unsure.

Each label-free score's AUROC is taken in a direction fixed here, before any label is seen
(`UNSUPERVISED`); an AUROC under 0.5 says the opposite direction held in this data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError
from . import detector as det
from .labels import read_labels, resolve_spans
from .steps import StepArrays, Tables, read_tables, step_arrays

# name -> (direction, meaning): +1 when higher values should mean ungrounded, -1 when lower.
UNSUPERVISED: dict[str, tuple[int, str]] = {
    "lookback_mean": (-1, "mean lookback ratio over steps, layers and heads: less attention on the context"),
    "attn_logdiag": (+1, "mean log attention of each query on itself (AttnLogDet-style): more attention "
                         "kept on the token itself rather than on the context"),
    "logprob_mean": (-1, "mean log-probability of the generated tokens: less confident"),
    "entropy_mean": (+1, "mean entropy of the next-token distribution: less confident"),
}


@dataclass(frozen=True)
class StudyOptions:
    folds: int = 5  # the usual k; refused when a class occurs in fewer generations than this
    seed: int = 0  # folds and bootstrap draws: a rerun gives the same numbers
    bootstrap: int = 1000  # resamples of the AUROC interval; 1000 keeps its 2.5/97.5 percentiles stable
    top: int = 10  # heads listed in the summary
    c: float = 1.0  # scikit-learn's default L2 inverse strength, on standardized features


@dataclass
class StudyResult:
    """What a study found. `units`: one row per labelled span (or per generation without labels)
    with its steps, label, score and label-free scores; `generations`: the label-free scores
    (and detector score) of every generation of the dataset."""

    mode: str  # "train" (labels), "apply" (a saved detector), "scores" (neither)
    dataset: str
    provenance: dict
    features: list[str]
    units: pd.DataFrame
    generations: pd.DataFrame
    detector: det.Detector | None = None
    sources: dict = field(default_factory=dict)  # the labels and detector files given
    metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Progress = Callable[[str], None]


def study(dataset: str | Path, labels: str | Path | None = None, detector: str | Path | None = None,
          options: StudyOptions = StudyOptions(), progress: Progress = lambda line: None,
          tables: Tables | None = None) -> StudyResult:
    """Run the grounding study on `dataset`: with `labels`, train and cross-validate a detector
    (or, with `detector` too, evaluate that one); with `detector` only, score every generation
    with it; with neither, the label-free scores. `tables` skips reading the dataset (tests)."""
    loaded = det.Detector.load(detector) if detector else None
    records = read_labels(labels) if labels else None  # the file's own problems before the dataset is read
    if records is not None and loaded is None:
        det.sklearn_required()
    tables = tables if tables is not None else read_tables(dataset)
    arrays = step_arrays(tables)
    notes = check_detector(loaded, detector, arrays, tables) if loaded is not None else []
    if records is not None:
        units = resolve_spans(labels, records, arrays.docs, tables.generations, tables.texts, tables.path)
        units["ungrounded"] = 1 - units["grounded"]
    else:
        units = whole_generations(arrays)
    progress(f"read {tables.path}: {len(arrays.docs)} generations, {int(arrays.docs['steps'].sum()):,} steps, "
             f"{len(arrays.features)} heads" + (f"; {len(units)} labelled spans" if records is not None else ""))
    result = StudyResult(mode_of(labels, detector), tables.path, tables.provenance, arrays.features,
                         with_scores(arrays, units), with_scores(arrays, whole_generations(arrays)), loaded,
                         {k: str(v) for k, v in (("labels", labels), ("detector", detector)) if v}, notes=notes)
    if result.mode == "train":
        _train(result, arrays, labels, options, progress)
    _apply(result, arrays)
    if records is not None:
        _evaluate(result, options, progress)
    result.metrics["most_suspect"] = most_suspect(result.generations, options.top)
    return result


def mode_of(labels: str | Path | None, detector: str | Path | None) -> str:
    """train (labels only), apply (a saved detector, with or without labels) or scores (neither)."""
    return "apply" if detector else "train" if labels else "scores"


def whole_generations(arrays: StepArrays) -> pd.DataFrame:
    """One unit per generation: all of its steps."""
    return pd.DataFrame({"doc_id": arrays.docs.index, "step_start": 0, "step_end": arrays.docs["steps"].to_numpy()})


def with_scores(arrays: StepArrays, units: pd.DataFrame) -> pd.DataFrame:
    """`units` with their label-free scores (`UNSUPERVISED`), over steps [step_start, step_end)."""
    lo, hi = arrays.rows(units["doc_id"], units["step_start"], units["step_end"])
    return units.assign(lookback_mean=arrays.overall_lookback(lo, hi),
                        attn_logdiag=arrays.step_mean(arrays.logdiag, lo, hi),
                        logprob_mean=arrays.step_mean(arrays.logprob, lo, hi),
                        entropy_mean=arrays.step_mean(arrays.entropy, lo, hi))


def _apply(result: StudyResult, arrays: StepArrays) -> None:
    """The detector's P(ungrounded) of every generation (`detector_score`) and, for a saved
    detector, of every unit (`score`; a detector trained here scored them out of fold)."""
    if result.detector is None:
        return
    if result.mode == "apply":
        result.units["score"] = result.detector.score(unit_features(arrays, result.units, result.detector.features))
    result.generations["detector_score"] = result.detector.score(
        unit_features(arrays, result.generations, result.detector.features))


def most_suspect(generations: pd.DataFrame, count: int) -> dict:
    """The generations most likely ungrounded: by the detector's score where there is a
    detector, else by the lowest mean lookback ratio."""
    by, ascending = ("detector_score", False) if "detector_score" in generations else ("lookback_mean", True)
    top = generations.dropna(subset=[by]).sort_values(by, ascending=ascending, kind="stable").head(count)
    return {"by": by, "generations": [{"doc_id": d, "value": float(v)} for d, v in zip(top["doc_id"], top[by])]}


def unit_features(arrays: StepArrays, units: pd.DataFrame, features: list[str] | None = None) -> np.ndarray:
    """(units, features): each head's mean lookback ratio over each unit's steps, in the order
    of `features` (default: every head of the dataset)."""
    lo, hi = arrays.rows(units["doc_id"], units["step_start"], units["step_end"])
    means = arrays.head_means(lo, hi)
    if features is None:
        return means
    return means[:, pd.Index(arrays.features).get_indexer(features)]


def check_detector(loaded: det.Detector, path: str | Path, arrays: StepArrays, tables: Tables) -> list[str]:
    """Refuse a detector trained on another shape of model, or on heads this dataset lacks;
    a note when it was trained on another model of the same shape."""
    trained = loaded.trained_on
    shape = [(k, trained.get(k), tables.provenance.get(k)) for k in ("num_layers", "num_heads")]
    if any(a is not None and b is not None and a != b for _, a, b in shape):
        raise ReadError(f"detector {path} was trained on {trained.get('model')!r} with {shape[0][1]} layers x "
                        f"{shape[1][1]} heads; {tables.path} is {tables.provenance.get('model')!r} with "
                        f"{shape[0][2]} layers x {shape[1][2]} heads")
    missing = [f for f in loaded.features if f not in set(arrays.features)]
    if missing:
        raise ReadError(f"detector {path} uses head {missing[0]} ({len(missing)} of its {len(loaded.features)} "
                        f"heads are missing), which the grounding table of {tables.path} does not have")
    model, here = trained.get("model"), tables.provenance.get("model")
    return [f"the detector was trained on {model!r}, applied here to {here!r}"] if model and here and model != here else []


def _train(result: StudyResult, arrays: StepArrays, labels: str | Path, options: StudyOptions,
           progress: Progress) -> None:
    """Out-of-fold scores, then the detector fit on every span, with its provenance."""
    units = result.units
    x = unit_features(arrays, units)
    positive = units["ungrounded"].to_numpy()
    progress(f"cross-validating on {len(units)} spans ({int(positive.sum())} ungrounded) of "
             f"{units['doc_id'].nunique()} generations: {options.folds} folds grouped by doc_id")
    scores, notes = det.cross_validated(x, positive, units["doc_id"], arrays.features, options.folds,
                                        options.seed, options.c, f"labels file {labels}")
    units["score"] = scores
    result.detector, fit_notes = det.fit(x, positive, arrays.features, options.c)
    result.detector.trained_on = {
        "dataset": result.dataset, "labels": str(labels), "spans": len(units),
        "ungrounded": int(positive.sum()), "generations": int(units["doc_id"].nunique()),
        **{k: result.provenance.get(k) for k in ("model", "num_layers", "num_heads", "weights_sha256", "revision")
           if result.provenance.get(k) is not None},
        "options": {"c": options.c, "folds": options.folds, "seed": options.seed}}
    result.notes += [f"cross-validation: {n}" for n in notes] + fit_notes


def _evaluate(result: StudyResult, options: StudyOptions, progress: Progress) -> None:
    """AUROC of the detector's scores (with its bootstrap interval) and of each label-free
    score, for finding ungrounded spans."""
    units = result.units
    positive = units["ungrounded"].to_numpy()
    metrics = {"spans": len(units), "ungrounded": int(positive.sum()), "generations": int(units["doc_id"].nunique())}
    if "score" in units:
        progress(f"bootstrap: {options.bootstrap} resamples of generations")
        low, high = det.bootstrap_interval(positive, units["score"].to_numpy(), units["doc_id"],
                                           options.bootstrap, options.seed)
        metrics["detector"] = {"auroc": det.auroc(positive, units["score"].to_numpy()), "ci95": [low, high],
                               "scores": "out-of-fold" if result.mode == "train" else "saved detector"}
    metrics["unsupervised"] = {name: _oriented_auroc(positive, units[name].to_numpy(), direction, meaning)
                               for name, (direction, meaning) in UNSUPERVISED.items()}
    if result.detector is not None:
        metrics["top_heads"] = result.detector.top(options.top)
    result.metrics = metrics


def _oriented_auroc(positive: np.ndarray, values: np.ndarray, direction: int, meaning: str) -> dict:
    """AUROC of direction * values over the units where the score is defined."""
    finite = np.isfinite(values)
    return {"auroc": det.auroc(positive[finite], direction * values[finite]),
            "higher_means_ungrounded": direction > 0, "meaning": meaning, "units": int(finite.sum())}
