"""The folder `attnpipe study distill` writes, by default STUDENT/_studies/distill-<teacher folder>
(the study describes the student against a teacher; `_studies` is never read as data). Written
with the grounding study's safe-output helpers (results.py): each file beside and renamed into
place, summary.json last.

    pairs.parquet        one row per (teacher_layer, student_layer): kl, js (per head, when head
                         counts match), kl_headmean, js_headmean
    heads.parquet        one row per (teacher_layer, student_layer, head): kl, js (equal head counts)
    mapping.parquet      one row per student layer: best, monotone and uniform teacher layers
    windows.parquet      one row per compared window: tokens on each side, common spans, aligned
                         (pooled onto them), the mean attention mass left out by the alignment
    edges_error.parquet  dense vs edges values on a sample of windows (runs with both)
    divergence.png       teacher layers x student layers heatmap of the mapping metric (matplotlib)
    summary.txt, summary.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path


from .. import __version__
from ..errors import ReadError
from .distill import DistillOptions, DistillResult
from .results import STUDIES, _json_default, _nan_to_none, _remove, _replace

FILES = ("pairs.parquet", "heads.parquet", "mapping.parquet", "windows.parquet", "edges_error.parquet",
         "divergence.png", "summary.txt", "summary.json")


def default_out(teacher: str | Path, student: str | Path) -> Path:
    """STUDENT/_studies/distill-<teacher folder name>."""
    if "://" in str(student):
        raise ReadError(f"{student} is a URL: give a local folder for the study's results with --out DIR")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(teacher).rstrip("/")).name) or "teacher"
    return Path(str(student).removeprefix("file://")) / STUDIES / f"distill-{name}"


def write(result: DistillResult, out: Path, options: DistillOptions) -> dict[str, Path]:
    """Write the study into `out` (checked with results.check_out against both runs)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReadError(f"cannot create {out}: {exc.strerror or exc}; choose another folder with --out") from None
    for name in FILES:
        _remove(out / name)
    written = {}
    frames = {"pairs": result.pairs, "heads": result.heads, "mapping": result.mapping,
              "windows": result.windows, "edges_error": result.edges_error}
    for name, frame in frames.items():
        if frame is not None:
            written[f"{name}.parquet"] = _replace(out / f"{name}.parquet",
                                                  lambda p, f=frame: f.to_parquet(p, index=False))
    notes = list(result.notes)
    png = heatmap_png(result)
    if png is None:
        notes.append("no divergence.png: matplotlib is not installed (pip install 'attnpipe[plot]')")
    else:
        written["divergence.png"] = _replace(out / "divergence.png", lambda p: p.write_bytes(png))
    summary = summary_dict(result, options, notes, [*written, "summary.txt", "summary.json"])
    text = summary_text(summary, out)
    written["summary.txt"] = _replace(out / "summary.txt", lambda p: p.write_text(text + "\n", encoding="utf-8"))
    written["summary.json"] = _replace(out / "summary.json", lambda p: p.write_text(
        json.dumps(_nan_to_none(summary), indent=1, default=_json_default) + "\n", encoding="utf-8"))
    return written


def _model(run) -> dict:
    p = run.provenance
    return {"path": run.path, "model": p.get("model"), "weights_sha256": p.get("weights_sha256"),
            "tokenizer": p.get("tokenizer"), "num_layers": p.get("num_layers"), "num_heads": p.get("num_heads")}


def summary_dict(result: DistillResult, options: DistillOptions, notes: list[str], files: list[str]) -> dict:
    d, m = result.divergences, result.mapping
    metric = result.metric
    summary = {"study": "distill", "teacher": _model(result.teacher), "student": _model(result.student),
               "source": result.source, "windows": d.windows, "rows": d.rows,
               "aligned": int(result.windows["aligned"].sum()),  # windows pooled onto common spans
               "dropped_mass": {"teacher": d.dropped_teacher / max(d.rows, 1),
                                "student": d.dropped_student / max(d.rows, 1)},
               "metric": metric, "options": {"metric": options.metric, "sample": options.sample, "seed": options.seed},
               "mapping": {name: {"teacher_layers": m[f"{name}_teacher_layer"].tolist(),
                                  "total": float(m[f"{name}_{metric}"].sum())}
                           for name in ("best", "monotone", "uniform")},
               "pairs": result.pairs.to_dict("records")}
    last = _last_layer_heads(result)
    if last is not None:
        summary["last_layer_heads"] = last
    if result.edges_error is not None:
        e = result.edges_error
        summary["edges_error"] = {"windows": e.attrs.get("windows"), "recipe": result.teacher.edges.label,
                                  **{c.removesuffix("_error"): {"max_abs": float(e[c].abs().max()),
                                                                "mean": float(e[c].mean())}
                                     for c in e.columns if c.endswith("_error")}}
    summary.update({"notes": notes, "files": files, "attnpipe_version": __version__})
    return summary


def _last_layer_heads(result: DistillResult) -> dict | None:
    """MiniLM's loss: per-head KL of the last teacher layer vs the last student layer."""
    if result.heads is None:
        return None
    h = result.heads
    last = h[(h["teacher_layer"] == h["teacher_layer"].max()) & (h["student_layer"] == h["student_layer"].max())]
    return {"teacher_layer": int(last["teacher_layer"].iloc[0]), "student_layer": int(last["student_layer"].iloc[0]),
            "kl": last["kl"].tolist(), "js": last["js"].tolist(), "kl_mean": float(last["kl"].mean())}


def summary_text(s: dict, out: Path) -> str:
    """A few lines for people: the runs, the layer-by-layer grid, the mappings, the caveats."""
    t, st = s["teacher"], s["student"]
    metric = s["metric"]
    lines = [f"distill study: teacher {t['model']} ({t['num_layers']} layers x {t['num_heads']} heads), "
             f"student {st['model']} ({st['num_layers']} x {st['num_heads']})",
             f"{s['windows']} windows, {s['rows']:,} query rows, from {s['source']}"
             + (" (exact)" if s["source"] == "maps" else " (approximate)")]
    if s["aligned"]:
        lines.append(f"tokenizers differ in {s['aligned']} windows: compared on common character spans; "
                     f"attention left out by alignment "
                     f"{s['dropped_mass']['teacher']:.3f} (teacher), {s['dropped_mass']['student']:.3f} (student)")
    lines.append(f"{metric} (nats; rows: teacher layer, columns: student layer):")
    grid = {(p["teacher_layer"], p["student_layer"]): p[metric] for p in s["pairs"]}
    lt, ls = t["num_layers"], st["num_layers"]
    lines.append("       " + "".join(f"{'S' + str(j):>8}" for j in range(ls)))
    lines += [f"  T{i:<4} " + "".join(f"{grid[(i, j)]:8.4f}" for j in range(ls)) for i in range(lt)]
    for name, what in (("best", "each student layer's closest teacher layer"),
                       ("monotone", "increasing, least total"), ("uniform", "TinyBERT (i+1)k-1")):
        mp = s["mapping"][name]
        lines.append(f"{name:<9} {mp['teacher_layers']}  total {metric} {mp['total']:.4f}  ({what})")
    if "last_layer_heads" in s:
        h = s["last_layer_heads"]
        lines.append(f"last layers (T{h['teacher_layer']} vs S{h['student_layer']}), KL per head: "
                     + " ".join(f"{v:.3f}" for v in h["kl"]))
    if "edges_error" in s:
        e = s["edges_error"]
        lines.append(f"edges ({e['recipe']}) vs dense on {e['windows']} windows: {metric} off by at most "
                     f"{e[metric]['max_abs']:.4f} (mean {e[metric]['mean']:+.4f})")
    lines += [f"note: {n}" for n in s["notes"]]
    lines.append(f"files in {out}: {', '.join(s['files'])}")
    return "\n".join(lines)


def heatmap_png(result: DistillResult) -> bytes | None:
    """Teacher layers x student layers heatmap of the mapping metric, with the best and uniform
    mappings marked; PNG bytes, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..read.plots import render

    grid = result.pairs.pivot(index="teacher_layer", columns="student_layer", values=result.metric).to_numpy()
    lt, ls = grid.shape
    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * ls + 2.5), max(3.0, 0.4 * lt + 1.5)))
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    m = result.mapping
    ax.scatter(m["student_layer"], m["best_teacher_layer"], marker="o", facecolors="none", edgecolors="red",
               s=120, label="best")
    ax.scatter(m["student_layer"], m["uniform_teacher_layer"], marker="x", color="white", s=60, label="uniform")
    ax.set_xticks(range(ls), [str(i) for i in range(ls)])
    ax.set_yticks(range(lt), [str(i) for i in range(lt)])
    ax.set_xlabel("student layer")
    ax.set_ylabel("teacher layer")
    ax.set_title(f"{result.metric} of attention rows (nats)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    return render(fig, "png")
