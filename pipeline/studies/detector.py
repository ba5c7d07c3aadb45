"""The grounding detector: logistic regression on standardized span features, kept as plain
numbers (a JSON file, never a pickle), and the AUROC that evaluates it.

Scoring needs numpy only: a span's features x (one lookback-ratio mean per head) become
z = (x - mean) / scale, with a head whose ratio was undefined over the whole span set to its
training mean (z = 0); the score is P(ungrounded) = 1 / (1 + exp(-(z . coef + intercept))).
Fitting and cross-validation use scikit-learn (the `study` extra), imported only when a detector
is trained.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError
from ..words import plural

FORMAT = "attnpipe.grounding-detector"
VERSION = 1  # bumped when the file's meaning changes; a reader refuses versions it does not know


def sklearn_required() -> None:
    """One line instead of an ImportError when the `study` extra is not installed."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ReadError("training a grounding detector needs scikit-learn, which is not installed: "
                        "pip install 'attnpipe[study]'") from None


@dataclass
class Detector:
    """A fitted detector: feature names (L{layer}H{head}), the scaler's mean and scale, the
    logistic regression's coefficients and intercept, and what it was trained on."""

    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    trained_on: dict = field(default_factory=dict)

    def score(self, x: np.ndarray) -> np.ndarray:
        """P(ungrounded) of each row of `x` (spans, features in `self.features` order)."""
        z = (np.where(np.isnan(x), self.mean, x) - self.mean) / self.scale
        return np.exp(-np.logaddexp(0.0, -(z @ self.coef + self.intercept)))  # the logistic, without overflow

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "positive_class": "ungrounded",
                "feature": "mean lookback ratio of each head over the span's steps",
                "features": self.features, "scaler": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
                "coef": self.coef.tolist(), "intercept": self.intercept, "trained_on": self.trained_on}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Detector":
        """Read a detector file; one ReadError line when it is not one this attnpipe writes."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ReadError(f"detector file {path} cannot be read as JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ReadError(f"detector file {path} is not a grounding detector (no \"format\": \"{FORMAT}\"); "
                            "give the detector.json a study wrote")
        if data.get("version") != VERSION:
            raise ReadError(f"detector file {path} has version {data.get('version')!r}; this attnpipe reads "
                            f"version {VERSION}")
        try:
            det = cls(features=[str(f) for f in data["features"]],
                      mean=np.asarray(data["scaler"]["mean"], dtype=np.float64),
                      scale=np.asarray(data["scaler"]["scale"], dtype=np.float64),
                      coef=np.asarray(data["coef"], dtype=np.float64), intercept=float(data["intercept"]),
                      trained_on=dict(data.get("trained_on") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReadError(f"detector file {path} is incomplete or damaged ({type(exc).__name__}: {exc})") from None
        n = len(det.features)
        if not (det.mean.shape == det.scale.shape == det.coef.shape == (n,)) or not np.all(det.scale > 0):
            raise ReadError(f"detector file {path}: features, scaler and coef must have one value per feature "
                            f"({n}), and every scale must be positive")
        return det

    def top(self, count: int) -> list[dict]:
        """The heads with the largest |coefficient| (standardized features, so comparable): a
        positive one raises P(ungrounded) as the head's lookback ratio rises."""
        order = np.argsort(-np.abs(self.coef), kind="stable")[:count]
        return [{"feature": self.features[i], **_layer_head(self.features[i]), "coef": float(self.coef[i])}
                for i in order]


def _layer_head(feature: str) -> dict:
    layer, head = feature[1:].split("H")
    return {"layer": int(layer), "head": int(head)}


def fit(x: np.ndarray, positive: np.ndarray, features: list[str], c: float) -> tuple[Detector, list[str]]:
    """Fit on every row: the scaler on the features (undefined values set to the column mean
    first), then L2 logistic regression with inverse strength `c`. Returns the detector and
    notes (a fit that did not converge)."""
    sklearn_required()
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    mean = np.nan_to_num(_column_means(x))
    filled = np.where(np.isnan(x), mean, x)
    scaler = StandardScaler().fit(filled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(filled), positive)
    notes = ["the logistic regression did not converge in 1000 iterations"] if any(
        issubclass(w.category, ConvergenceWarning) for w in caught) else []
    det = Detector(features=list(features), mean=scaler.mean_.astype(np.float64),
                   scale=scaler.scale_.astype(np.float64), coef=model.coef_[0].astype(np.float64),
                   intercept=float(model.intercept_[0]))
    return det, notes


def _column_means(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column undefined everywhere: NaN, then 0
        return np.nanmean(x, axis=0)


def check_enough(positive: np.ndarray, groups: pd.Series, folds: int, source: str) -> None:
    """Refuse when a class occurs in fewer generations than there are folds: grouped folds
    would leave a fold without it, and the AUROC would rest on too little."""
    for cls, name in ((0, "grounded"), (1, "ungrounded")):
        mask = positive == cls
        spans, docs = int(mask.sum()), int(groups[mask].nunique())
        if docs < folds:
            raise ReadError(f"{source}: {plural(spans, name + ' span')} in {plural(docs, 'generation')}; {folds}-fold "
                            f"cross-validation grouped by doc_id needs {name} spans in at least {folds} "
                            "generations: label more, or lower --folds (at least 2)")


def cross_validated(x: np.ndarray, positive: np.ndarray, groups: pd.Series, features: list[str], folds: int,
                    seed: int, c: float, source: str) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold P(ungrounded) of every row: stratified by label, grouped by doc_id (the spans
    of one generation are never split between training and test), seeded. Each fold fits its own
    scaler and model on its training rows only."""
    sklearn_required()
    from sklearn.model_selection import StratifiedGroupKFold

    check_enough(positive, groups, folds, source)
    scores, notes = np.full(len(positive), np.nan), []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, positive, groups.to_numpy()):
        if len(set(positive[train])) < 2:
            raise ReadError(f"{source}: a cross-validation fold has only one class to train on; label "
                            "more generations of each class, or lower --folds")
        det, fold_notes = fit(x[train], positive[train], features, c)
        scores[test] = det.score(x[test])
        notes += fold_notes
    return scores, sorted(set(notes))


def auroc(positive: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None):
    """Area under the ROC curve for finding the positive (ungrounded) rows by `score`: the
    probability that a random positive scores above a random negative, ties counted half
    (Mann-Whitney U over n_pos * n_neg). `weight` (rows,) or (resamples, rows) weighs rows
    (bootstrap counts): one AUROC per row of it. NaN where a class has no weight."""
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=np.float64)
    w = np.ones((1, len(score))) if weight is None else np.atleast_2d(np.asarray(weight, dtype=np.float64))
    order = np.argsort(score, kind="stable")
    sorted_score, pos = score[order], positive[order]
    ties = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # first row of each distinct score
    wp = np.add.reduceat(w[:, order] * pos, ties, axis=1)  # (resamples, distinct scores)
    wn = np.add.reduceat(w[:, order] * ~pos, ties, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each distinct score
    total = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, (wp * (below + 0.5 * wn)).sum(axis=1) / total, np.nan)
    return float(out[0]) if weight is None or np.ndim(weight) == 1 else out


def bootstrap_interval(positive: np.ndarray, score: np.ndarray, groups: pd.Series, resamples: int,
                       seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUROC over `resamples` bootstrap samples that draw whole
    generations (doc_ids) with replacement, since spans of one generation are not independent.
    Samples with one class only are left out. Seeded: the same interval on every run."""
    codes, uniques = pd.factorize(groups)
    n_groups = len(uniques)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups))
    flat = (draws + n_groups * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=resamples * n_groups).reshape(resamples, n_groups)
    values = auroc(positive, score, counts[:, codes])
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)
