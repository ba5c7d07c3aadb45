"""Rank attention heads by the effect of an intervention on each alone (`attnpipe study heads`).

The scan itself (one intervention per head, through the job API) is pipeline/control/heads.py;
this file reads its `effects` table and ranks. A head's effect is the mean over the sample's
windows of one measure (--target):

- cosine:     1 - cosine of the pooled embeddings (how far the sentence embedding moved);
- kl_mean, kl_last: KL(unedited || intervened) of the next-token distributions (nats);
- logit_diff: (logit(t0) - logit(t1)) intervened minus unedited, ranked by its absolute value.

With it, the standard error over windows, and the windows where the intervention selected no key
(they count as no effect: the head was steered but had nothing to act on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError

TARGETS = {
    "cosine": "1 - cosine",
    "kl_mean": "kl_mean",
    "kl_last": "kl_last",
    "logit_diff": "logit_diff - logit_diff_clean",
}


@dataclass
class Ranking:
    table: pd.DataFrame  # one row per head: layer, head, effect, stderr, windows, empty
    target: str
    windows: int


def check_target(target: str, logits: bool, targets: list[str]) -> None:
    """Refuse, before any run, a target the job's [effects] cannot record."""
    if target in ("kl_mean", "kl_last", "logit_diff") and not logits:
        raise ReadError(f"--target {target} needs [effects] logits = true in the job (a decoder language model)")
    if target == "logit_diff" and not targets:
        raise ReadError("--target logit_diff needs [effects] targets = [\"tok1\", \"tok2\"] in the job")


def rank(effects: pd.DataFrame, target: str) -> Ranking:
    """Heads ranked by their mean effect (labels L<layer>.H<head>, control.heads.head_label)."""
    if target not in TARGETS:
        raise ReadError(f"--target {target!r}: valid targets are {', '.join(TARGETS)}")
    values = _effect(effects, target)
    if values.isna().all():
        raise ReadError(f"--target {target}: the scan recorded no {target} (kl_* and logit_diff need [effects] "
                        "logits = true, logit_diff also targets); choose cosine or set them in the job")
    frame = effects.assign(effect=values, empty=effects["keys"] == 0)
    grouped = frame.groupby("label")
    table = pd.DataFrame({"effect": grouped["effect"].mean(), "stderr": grouped["effect"].sem(ddof=1),
                          "windows": grouped["effect"].count(), "empty": grouped["empty"].sum()})
    parts = table.index.str.extract(r"^L(\d+)\.H(\d+)$").astype("Int64")
    table.insert(0, "layer", parts[0].to_numpy())
    table.insert(1, "head", parts[1].to_numpy())
    order = table["effect"].abs() if target == "logit_diff" else table["effect"]
    table = table.loc[order.sort_values(ascending=False, kind="stable").index].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return Ranking(table, target, int(effects.groupby(["doc_id", "window_index"]).ngroups))


def _effect(effects: pd.DataFrame, target: str) -> pd.Series:
    if target == "cosine":
        return 1.0 - effects["cosine"]
    if target == "logit_diff":
        return effects["logit_diff"] - effects["logit_diff_clean"]
    return effects[target]


def grid(ranking: Ranking) -> pd.DataFrame:
    """layers x heads of the effect (for the summary)."""
    return ranking.table.pivot(index="layer", columns="head", values="effect")


def summary(ranking: Ranking, top: int, combined: pd.DataFrame | None = None) -> str:
    """The text the command prints and writes to summary.txt."""
    t = ranking.table
    lines = [f"Head scan: {len(t)} heads, each steered alone on {ranking.windows} windows; "
             f"effect = mean {TARGETS[ranking.target]} (larger = the output moved more)", ""]
    head = t.head(top).copy()
    lines.append(head.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    lines += ["", "effect by layer (rows) and head (columns):",
              grid(ranking).to_string(float_format=lambda v: f"{v:.3g}")]
    if combined is not None and len(combined):
        effect = _effect(combined, ranking.target)
        lines += ["", f"the top {top} heads together: mean {TARGETS[ranking.target]} = {effect.mean():.4g} "
                      f"(min {effect.min():.4g}, max {effect.max():.4g}) over {len(combined)} windows"]
    return "\n".join(lines) + "\n"


def top_heads_toml(ranking: Ranking, top: int, template_label: str) -> str:
    """An [[interventions]] entry for the top heads together, to paste into a job."""
    pairs = ", ".join(f"[{int(r.layer)}, {int(r.head)}]" for r in ranking.table.head(top).itertuples())
    return (f"# the top {top} heads of the scan by {ranking.target}; op and keys as in {template_label}\n"
            f"layer_heads = [{pairs}]\n")


def write(ranking: Ranking, out: Path, top: int, combined: pd.DataFrame | None, template_label: str) -> str:
    """ranking.csv, summary.txt and top_heads.toml into `out`; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    ranking.table.to_csv(out / f"ranking-{ranking.target}.csv", index=False)
    text = summary(ranking, top, combined)
    (out / f"summary-{ranking.target}.txt").write_text(text, encoding="utf-8")
    (out / f"top_heads-{ranking.target}.toml").write_text(top_heads_toml(ranking, top, template_label),
                                                          encoding="utf-8")
    return text


def effects_of(dataset) -> pd.DataFrame:
    """The effects table of a scan's dataset, as pandas."""
    if "effects" not in dataset.tables:
        raise ReadError(f"{dataset}: no effects table; run a job with [[interventions]]")
    return dataset.to_pandas("effects")
