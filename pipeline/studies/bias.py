"""The bias study: attention between word groups in two runs over paired corpora (pro- vs
anti-stereotyped sentences, WinoBias-style), per layer and head.

Each run's `group_mass` table (the groups recipe) says, per document, layer and head, how much the
from-group's tokens attend to the to-group's. Documents of the two runs are paired (by default by
their row in the corpus: WinoBias's pro and anti files are line-aligned minimal pairs), and for
every (layer, head):

    d_i    = mass_A(pair i) - mass_B(pair i)       (a document's windows averaged first)
    mean   = the mean of d_i over the n pairs
    ci95   = percentile bootstrap interval of the mean (pairs resampled, seeded)
    p      = two-sided sign-flip permutation p-value of the mean (d_i -> ±d_i, seeded; +1 smoothed)
    q      = Benjamini-Hochberg adjusted p over every head tested (false discovery rate)

The heads that differ most are those with the smallest q, then the largest |mean|. Mean is in
attention mass (0..1): the share of a from-token's attention that the to-group's tokens get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError

PAIR_KEYS = ("corpus_row", "source_index", "doc_id")


@dataclass
class BiasOptions:
    from_group: str | None = None
    to_group: str | None = None
    pair_by: str = "corpus_row"
    resamples: int = 2000
    seed: int = 0
    alpha: float = 0.05
    top: int = 10


@dataclass
class BiasResult:
    heads: pd.DataFrame  # one row per (layer, head): mean, ci_low, ci_high, p, q, significant, n
    pairs: int
    from_group: str
    to_group: str
    a: str
    b: str
    provenance: dict = field(default_factory=dict)


def read_mass(path: str | Path, label: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(group_mass rows, documents, provenance) of one run; ReadError naming the run otherwise."""
    from ..read import open_dataset

    try:
        ds = open_dataset(path)
    except Exception as exc:  # noqa: BLE001 - open_dataset raises the library's own one-line errors
        raise ReadError(f"{label} {path}: {exc}") from None
    if "group_mass" not in ds.tables:
        raise ReadError(f"{label} {path} has no group_mass table: add [[groups]] and the groups recipe to its job "
                        "and run it")
    mass = ds.sql("SELECT doc_id, window_index, layer, head, from_group, to_group, mass FROM group_mass "
                  "WHERE stack IS NULL OR attention = 'self'")
    docs = ds.sql("SELECT doc_id, corpus_row, source_index FROM documents")
    return mass, docs, ds.provenance


def pick_groups(mass: pd.DataFrame, options: BiasOptions, label: str) -> tuple[str, str]:
    """The (from, to) pair to compare: as given; or, when the run has exactly two groups and
    neither is given, the first in name order to the second."""
    names = sorted(set(mass.from_group) | set(mass.to_group))
    chosen = [options.from_group, options.to_group]
    if chosen == [None, None] and len(names) == 2:
        return names[0], names[1]
    if None in chosen:
        raise ReadError(f"{label} has the groups {', '.join(names)}: name the pair to compare with --from and --to")
    for name in chosen:
        if name not in names:
            raise ReadError(f"group {name!r} is not in {label}'s group_mass; its groups: {', '.join(names)}")
    return options.from_group, options.to_group


def paired_differences(a: pd.DataFrame, da: pd.DataFrame, b: pd.DataFrame, db: pd.DataFrame, groups: tuple[str, str],
                       pair_by: str) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """(d (pairs, layer*head), [(layer, head)], pairs): A's mass minus B's for every paired document
    where both have the groups."""
    def per_doc(mass: pd.DataFrame, docs: pd.DataFrame) -> pd.DataFrame:
        sel = mass[(mass.from_group == groups[0]) & (mass.to_group == groups[1])]
        per = sel.groupby(["doc_id", "layer", "head"], observed=True).mass.mean().unstack(["layer", "head"])
        keys = docs.set_index("doc_id")[pair_by] if pair_by != "doc_id" else pd.Series(docs.doc_id.values, docs.doc_id)
        per.index = keys.reindex(per.index).values
        return per

    pa_, pb_ = per_doc(a, da), per_doc(b, db)
    if pa_.index.hasnans or pb_.index.hasnans:
        raise ReadError(f"--pair-by {pair_by}: some documents have no {pair_by}; pair by doc_id or corpus_row")
    common = pa_.index.intersection(pb_.index)
    heads = sorted(set(pa_.columns) & set(pb_.columns))
    if len(common) < 2 or not heads:
        raise ReadError(f"only {len(common)} document pairs (by {pair_by}) have both groups in both runs; the study "
                        "needs at least 2: check that the runs cover paired corpora and the same groups")
    d = pa_.loc[common, heads].to_numpy(float) - pb_.loc[common, heads].to_numpy(float)
    return d, [tuple(map(int, h)) for h in heads], len(common)


def head_tests(d: np.ndarray, resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Mean paired difference per column of `d` (pairs, heads), its bootstrap interval, the
    sign-flip permutation p-value and the Benjamini-Hochberg q-value; NaN pairs (a head a pair
    lacks) are left out of that head's figures."""
    rng = np.random.default_rng(seed)
    n, k = d.shape
    valid = ~np.isnan(d)
    x = np.where(valid, d, 0.0)
    count = valid.sum(0).clip(min=1)
    mean = x.sum(0) / count
    boot = np.empty((resamples, k))
    flips = np.empty((resamples, k))
    for r in range(resamples):  # one draw of pairs (and of signs) for every head at once
        idx = rng.integers(0, n, n)
        boot[r] = x[idx].sum(0) / valid[idx].sum(0).clip(min=1)
        signs = rng.choice([-1.0, 1.0], size=(n, 1))
        flips[r] = (x * signs).sum(0) / count
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    p = ((np.abs(flips) >= np.abs(mean) - 1e-12).sum(0) + 1) / (resamples + 1)
    return {"mean": mean, "ci_low": low, "ci_high": high, "p": p, "q": benjamini_hochberg(p), "n": valid.sum(0)}


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Adjusted p-values controlling the false discovery rate (Benjamini and Hochberg 1995)."""
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def study(a: str | Path, b: str | Path, options: BiasOptions) -> BiasResult:
    if options.pair_by not in PAIR_KEYS:
        raise ReadError(f"--pair-by {options.pair_by!r}: use one of {', '.join(PAIR_KEYS)}")
    mass_a, docs_a, prov_a = read_mass(a, "--a")
    mass_b, docs_b, prov_b = read_mass(b, "--b")
    groups = pick_groups(mass_a, options, "--a")
    for key in ("model", "num_layers", "num_heads"):
        if prov_a.get(key) != prov_b.get(key):
            raise ReadError(f"--a and --b were run with different models ({key}: {prov_a.get(key)} vs "
                            f"{prov_b.get(key)}); compare two runs of one model")
    d, heads, pairs = paired_differences(mass_a, docs_a, mass_b, docs_b, groups, options.pair_by)
    tests = head_tests(d, options.resamples, options.seed)
    table = pd.DataFrame({"layer": [h[0] for h in heads], "head": [h[1] for h in heads], **tests})
    table["significant"] = table.q < options.alpha
    table = table.sort_values(["q", "mean"], key=lambda c: c if c.name == "q" else -c.abs()).reset_index(drop=True)
    return BiasResult(table, pairs, groups[0], groups[1], str(a), str(b),
                      {"model": prov_a.get("model"), "num_layers": prov_a.get("num_layers"),
                       "num_heads": prov_a.get("num_heads")})


def summary(result: BiasResult, options: BiasOptions) -> dict:
    top = result.heads.head(options.top)
    return {"study": "bias", "a": result.a, "b": result.b, "pairs": result.pairs, "from_group": result.from_group,
            "to_group": result.to_group, "pair_by": options.pair_by, "model": result.provenance,
            "options": {"resamples": options.resamples, "seed": options.seed, "alpha": options.alpha},
            "heads_tested": int(len(result.heads)), "significant": int(result.heads.significant.sum()),
            "mean_over_heads": float(result.heads["mean"].mean()),
            "top": [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                    for row in top.to_dict("records")]}


def summary_text(s: dict) -> str:
    lines = [f"bias study: {s['a']} (A) vs {s['b']} (B), {s['pairs']} pairs by {s['pair_by']}; model "
             f"{s['model'].get('model')} ({s['model'].get('num_layers')} layers x {s['model'].get('num_heads')} heads)",
             f"attention mass from {s['from_group']} to {s['to_group']}, A - B per layer and head: "
             f"{s['significant']} of {s['heads_tested']} heads differ at FDR {s['options']['alpha']} "
             f"(Benjamini-Hochberg over sign-flip permutation p-values, {s['options']['resamples']} draws); "
             f"mean over heads {s['mean_over_heads']:+.4f}",
             "heads that differ most (mean A - B [95% bootstrap interval], q):"]
    for row in s["top"]:
        lines.append(f"  L{row['layer']}H{row['head']:<3} {row['mean']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
                     f"  q={row['q']:.3g}{'  *' if row['significant'] else ''}")
    return "\n".join(lines)


def heatmap_png(result: BiasResult) -> bytes | None:
    """Layers x heads of the mean difference (A - B); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    h = result.heads
    grid = np.full((int(h.layer.max()) + 1, int(h["head"].max()) + 1), np.nan)
    grid[h.layer.to_numpy(), h["head"].to_numpy()] = h["mean"].to_numpy()
    limit = np.nanmax(np.abs(grid)) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * grid.shape[1], 1.0 + 0.4 * grid.shape[0]))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for row in h[h.significant].itertuples():
        ax.text(row.head, row.layer, "*", ha="center", va="center", fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"attention mass {result.from_group} -> {result.to_group}: A - B\n(* FDR-significant)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write(result: BiasResult, out: Path, options: BiasOptions, checked=None) -> dict:
    """heads.parquet, summary.json, summary.txt and heatmap.png (with matplotlib) into `out`; with
    `checked` (pipeline/studies/bias_check.py), its figures and check_random.parquet."""
    from .results import _remove, _replace

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReadError(f"cannot create {out}: {exc.strerror or exc}; choose another folder with --out") from None
    for name in ("heads.parquet", "summary.json", "summary.txt", "heatmap.png", "check_random.parquet"):
        _remove(out / name)
    s = summary(result, options)
    extra = ""
    if checked is not None:
        from .bias_check import summary_lines

        s["check"] = {"heads": [f"L{l}H{h}" for l, h in checked.heads], "top": checked.top, "pairs": checked.pairs,
                      "random_sets": len(checked.random), "random_mean": float(checked.random.g.mean()),
                      "random_sd": float(checked.random.g.std(ddof=1)), "share_random_at_least": checked.p_random}
        _replace(out / "check_random.parquet", lambda p: checked.random.to_parquet(p, index=False))
        extra = "\n" + "\n".join(summary_lines(checked))
    _replace(out / "heads.parquet", lambda p: result.heads.to_parquet(p, index=False))
    png = heatmap_png(result)
    if png is not None:
        _replace(out / "heatmap.png", lambda p: p.write_bytes(png))
    files = ["heads.parquet"] + (["heatmap.png"] if png else []) + (["check_random.parquet"] if checked else [])
    text = summary_text(s) + extra + f"\nfiles in {out}: {', '.join(files)}, summary.txt, summary.json"
    _replace(out / "summary.txt", lambda p: p.write_text(text + "\n", encoding="utf-8"))
    _replace(out / "summary.json", lambda p: p.write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8"))
    return s
