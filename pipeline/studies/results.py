"""The folder a study writes: where it is, what is in it, and how it is written.

By default a study writes inside the dataset it read, in `OUT/_studies/grounding-<mode>/`
(train, apply or scores): the results travel with the data they describe, and `_studies`, like
the dataset's other `_` folders, is never read as data (verify, status, open_dataset and URL
mirrors look only at table folders and records). Anywhere else inside a dataset folder is
refused, so a study can never overwrite a table file or a commit record.

    summary.json               everything below in numbers, with the options and provenance
    summary.txt                the same, short, for people (what the command prints)
    scores.parquet             one row per unit (labelled span, or generation without labels):
                               steps, label, score (P(ungrounded)), label-free scores
    generation_scores.parquet  every generation: label-free scores (and detector_score)
    detector.json              the fitted detector, plain numbers (train)
    coefficients.png           layers x heads of its coefficients (train; needs matplotlib)

Only these names are ever written or removed; each is written beside and renamed into place,
and summary.json last, so a folder with a summary.json holds one complete study.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ReadError
from ..store.paths import VERSION_DIR
from .grounding import StudyOptions, StudyResult

STUDIES = "_studies"
FILES = ("summary.json", "summary.txt", "scores.parquet", "generation_scores.parquet", "detector.json",
         "coefficients.png")


def default_out(dataset: str | Path, mode: str) -> Path:
    """OUT/_studies/grounding-<mode>; a dataset at a URL has no folder of ours to write in."""
    from ..read.remote import is_url

    if is_url(dataset):
        raise ReadError(f"{dataset} is a URL: give a local folder for the study's results with --out DIR")
    return Path(str(dataset).removeprefix("file://")) / STUDIES / f"grounding-{mode}"


def check_out(out: str | Path, dataset: str | Path) -> Path:
    """`out`, resolved, after refusing a file and places inside the dataset folder (or its parent
    output, for a version folder OUT/v2) other than the dataset's `_studies` folder. Nothing is
    created yet: a study that fails leaves no folder behind."""
    from ..read.remote import is_url

    target = Path(out).resolve()
    if not is_url(dataset):
        root = Path(str(dataset).removeprefix("file://")).resolve()
        roots = [root] + ([root.parent] if VERSION_DIR.match(root.name) else [])
        inside = any(target == r or r in target.parents for r in roots)
        if inside and (root / STUDIES) not in target.parents:
            raise ReadError(f"refusing to write study results to {out}: it is inside the dataset folder {root}, "
                            f"where only {root / STUDIES}/... may hold them (the default); or choose a folder "
                            "outside it")
    if target.exists() and not target.is_dir():
        raise ReadError(f"--out {out} is a file; give a folder for the study's results")
    return target


def write(result: StudyResult, out: Path, options: StudyOptions) -> tuple[dict[str, Path], list[str]]:
    """Write the study into `out` (checked by `check_out`). Returns the files written and notes."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReadError(f"cannot create {out}: {exc.strerror or exc}; choose another folder with --out") from None
    for name in FILES:  # this study's names only: a file of an earlier run must not mix with this one
        _remove(out / name)
    written, notes = {}, []
    written["scores.parquet"] = _replace(out / "scores.parquet", lambda p: result.units.to_parquet(p, index=False))
    written["generation_scores.parquet"] = _replace(
        out / "generation_scores.parquet", lambda p: result.generations.to_parquet(p, index=False))
    if result.mode == "train":
        written["detector.json"] = _replace(out / "detector.json", result.detector.save)
        png = coefficient_png(result)
        if png is None:
            notes.append("no coefficients.png: matplotlib is not installed (pip install 'attnpipe[plot]')")
        else:
            written["coefficients.png"] = _replace(out / "coefficients.png", lambda p: p.write_bytes(png))
    summary = summary_dict(result, options, notes, [*written, "summary.txt", "summary.json"])
    text = summary_text(summary, out)
    written["summary.txt"] = _replace(out / "summary.txt", lambda p: p.write_text(text + "\n", encoding="utf-8"))
    written["summary.json"] = _replace(out / "summary.json", lambda p: p.write_text(
        json.dumps(summary, indent=1, default=_json_default) + "\n", encoding="utf-8"))
    return written, notes


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)  # a link is removed, never followed
    except OSError as exc:
        raise ReadError(f"cannot replace {path}: {exc.strerror or exc}") from None


def _replace(path: Path, write_to: Callable[[Path], None]) -> Path:
    """Write through a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise ReadError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def summary_dict(result: StudyResult, options: StudyOptions, notes: list[str], files: list[str]) -> dict:
    p = result.provenance
    return {"study": "grounding", "mode": result.mode, "dataset": result.dataset,
            "model": p.get("model"), "num_layers": p.get("num_layers"), "num_heads": p.get("num_heads"),
            "heads": len(result.features), "generations": len(result.generations), **result.sources,
            "options": {"folds": options.folds, "seed": options.seed, "bootstrap": options.bootstrap,
                        "c": options.c, "positive_class": "ungrounded"},
            "metrics": _nan_to_none(result.metrics), "notes": result.notes + notes, "files": files,
            "attnpipe_version": __version__}


def _nan_to_none(value):
    """JSON has no NaN: an AUROC that could not be computed is null."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_text(summary: dict, out: Path) -> str:
    """A few lines for people: what was studied, the AUROCs, the top heads, where files went."""
    m = summary["metrics"]
    model = summary["model"] or "model not recorded"
    shape = f", {summary['num_layers']} layers x {summary['num_heads']} heads" if summary["num_layers"] else ""
    lines = [f"grounding study ({summary['mode']}) of {summary['dataset']} ({model}{shape}): "
             f"{summary['generations']} generations, {summary['heads']} heads in the grounding table"]
    if "spans" in m:
        lines.append(f"labels {summary.get('labels')}: {m['spans']} spans, {m['ungrounded']} ungrounded, "
                     f"from {m['generations']} generations")
    if "detector" in m:
        d, o = m["detector"], summary["options"]
        how = (f"out-of-fold, {o['folds']} folds grouped by doc_id" if summary["mode"] == "train"
               else f"detector {summary.get('detector')}")
        lines.append(f"detector AUROC {_num(d['auroc'])} [{_num(d['ci95'][0])}, {_num(d['ci95'][1])}] "
                     f"({how}; 95% bootstrap interval over generations, {o['bootstrap']} resamples)")
    if "unsupervised" in m:
        lines.append("label-free scores, AUROC for finding ungrounded spans:")
        lines += [f"  {name:<14} {_num(u['auroc'])}  ({'higher' if u['higher_means_ungrounded'] else 'lower'}"
                  " = ungrounded)" for name, u in m["unsupervised"].items()]
    if m.get("top_heads"):
        lines.append("heads carrying the most weight (coefficient of the standardized mean lookback ratio; "
                     "negative: a higher ratio means grounded):")
        lines += [f"  {h['feature']:<8} {h['coef']:+.3f}" for h in m["top_heads"]]
    if m.get("most_suspect", {}).get("generations"):
        what = ("lowest mean lookback ratio" if m["most_suspect"]["by"] == "lookback_mean"
                else "highest detector score" if summary["mode"] == "apply"
                else "highest score of the detector fit here, in-sample on labelled generations")
        lines.append(f"generations most likely ungrounded ({what}): " + ", ".join(
            f"{g['doc_id']} {g['value']:.3f}" for g in m["most_suspect"]["generations"][:5]))
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"files in {out}: {', '.join(summary['files'])}")
    return "\n".join(lines)


def coefficient_png(result: StudyResult) -> bytes | None:
    """A layers x heads heatmap of the detector's coefficients as PNG bytes; None without
    matplotlib (the plot is optional)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: never a window
    import matplotlib.pyplot as plt

    from ..read.plots import render

    d = result.detector
    heads = d.top(len(d.features))
    layers, cols = sorted({h["layer"] for h in heads}), sorted({h["head"] for h in heads})
    grid = np.full((len(layers), len(cols)), np.nan)
    for h in heads:
        grid[layers.index(h["layer"]), cols.index(h["head"])] = h["coef"]
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(cols) + 2), max(2.5, 0.3 * len(layers) + 1.4)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=7)
    ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("grounding detector: coefficient of each head's mean lookback ratio\n"
                 "(red: a higher ratio means ungrounded; blue: grounded)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="coefficient (standardized)")
    return render(fig, "png")
