"""The check that matters after a bias study: do the heads it found change the model's output
differently for the two corpora, when their attention to the to-group is removed, more than
random heads of the same number do?

Both runs' corpora are run again through their own recorded job (the job API, as `attnpipe run`),
with one intervention per head set, all in one run per corpus: `zero` on the to-group's tokens as
keys (every query) in the chosen heads at once (pipeline/control). The `effects` table then gives,
per document and head set, the cosine between the pooled embedding with and without the edit.

For a head set S, the shift of document i is 1 - cosine; the *gap change* is

    g(S) = mean over pairs of shift_A(i) - shift_B(i)

the difference the edit makes between the paired documents of A and B. It is reported for the
study's top heads with a bootstrap interval over pairs, beside the same for `random` sets of as
many heads drawn uniformly (seeded) from all heads, and the share of random sets whose |g| is at
least the top heads' (+1 smoothed): small when the found heads matter for the A/B difference.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError


@dataclass
class CheckResult:
    heads: list[tuple[int, int]]
    top: dict  # g, ci_low, ci_high, shift_a, shift_b
    random: pd.DataFrame  # one row per random set: g, shift_a, shift_b
    p_random: float
    pairs: int


def head_sets(heads: pd.DataFrame, count: int, sets: int, seed: int, layers: int, per_layer: int
              ) -> list[list[tuple[int, int]]]:
    """The study's `count` top heads (its table is sorted, most different first), then `sets`
    random sets of as many distinct heads."""
    top = [(int(r.layer), int(r.head)) for r in heads.head(count).itertuples()]
    rng = np.random.default_rng(seed)
    every = [(layer, head) for layer in range(layers) for head in range(per_layer)]
    chosen = [[every[i] for i in sorted(rng.choice(len(every), size=len(top), replace=False))] for _ in range(sets)]
    return [top] + chosen


def edited_job(path: str | Path, to_group: str, sets: list[list[tuple[int, int]]], out: Path):
    """The job that wrote `path`, with the head sets' interventions, the groups recipe only, and
    `out` as its output."""
    from ..job import build_job
    from ..read import open_dataset

    with open_dataset(path) as ds:
        stored = ds.job
    if not stored:
        raise ReadError(f"{path} records no job (_dataset.json); the check reruns the job that wrote it")
    base = stored.pop("base_dir", ".")
    stored.pop("interventions", None)
    stored["interventions"] = [
        {"label": "top" if i == 0 else f"random{i}", "op": "zero", "layer_heads": [list(h) for h in heads],
         "keys": {"group": to_group}} for i, heads in enumerate(sets)]
    stored["recipes"] = [{"name": "groups"}]
    stored["run"] = {**stored.get("run", {}), "output": str(out), "progress": False}
    return build_job(stored, source=f"{path}'s job", base_dir=base)


def shifts(ds) -> pd.DataFrame:
    """(pair key, label) -> 1 - cosine, windows averaged."""
    effects = ds.sql("SELECT e.doc_id, e.label, avg(1 - e.cosine) AS shift, any_value(d.corpus_row) AS corpus_row "
                     "FROM effects e JOIN documents d USING (doc_id) GROUP BY e.doc_id, e.label")
    return effects.pivot_table(index="corpus_row", columns="label", values="shift")


def check(a: str | Path, b: str | Path, heads: pd.DataFrame, to_group: str, count: int, sets: int, seed: int,
          layers: int, per_layer: int, progress=print) -> CheckResult:
    from ..api import run as run_job

    chosen = head_sets(heads, count, sets, seed, layers, per_layer)
    found = []
    with tempfile.TemporaryDirectory(prefix="attnpipe-bias-check-") as tmp:
        for name, path in (("A", a), ("B", b)):
            progress(f"check: {name} ({path}) again with {len(chosen)} interventions (top {len(chosen[0])} heads, "
                     f"{sets} random sets)")
            ds = run_job(edited_job(path, to_group, chosen, Path(tmp) / name), quiet=True)
            found.append(shifts(ds))
            ds.close()
    sa, sb = found
    common = sa.index.intersection(sb.index)
    if len(common) < 2:
        raise ReadError("fewer than 2 document pairs have effects in both runs; nothing to compare")
    diff = sa.loc[common] - sb.loc[common]  # (pairs, label)
    rng = np.random.default_rng(seed)
    top = diff["top"].to_numpy()
    boot = np.array([top[rng.integers(0, len(top), len(top))].mean() for _ in range(2000)])
    labels = [f"random{i}" for i in range(1, sets + 1)]
    random = pd.DataFrame({"set": labels, "g": [diff[x].mean() for x in labels],
                           "shift_a": [sa.loc[common, x].mean() for x in labels],
                           "shift_b": [sb.loc[common, x].mean() for x in labels],
                           "heads": [" ".join(f"L{l}H{h}" for l, h in s) for s in chosen[1:]]})
    g = float(top.mean())
    p = float((1 + (random.g.abs() >= abs(g)).sum()) / (1 + len(random)))
    return CheckResult(chosen[0], {"g": g, "ci_low": float(np.percentile(boot, 2.5)),
                                   "ci_high": float(np.percentile(boot, 97.5)),
                                   "shift_a": float(sa.loc[common, "top"].mean()),
                                   "shift_b": float(sb.loc[common, "top"].mean())}, random, p, len(common))


def summary_lines(c: CheckResult) -> list[str]:
    t = c.top
    r = c.random
    return [f"check: the top {len(c.heads)} heads ({' '.join(f'L{l}H{h}' for l, h in c.heads)}) with their attention "
            f"to the to-group removed: pooled-embedding shift A {t['shift_a']:.4f}, B {t['shift_b']:.4f}; "
            f"gap change A - B {t['g']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] over {c.pairs} pairs",
            f"       {len(r)} random sets of {len(c.heads)} heads: gap change {r.g.mean():+.4f} (sd {r.g.std(ddof=1):.4f}; "
            f"shifts A {r.shift_a.mean():.4f}, B {r.shift_b.mean():.4f}); share of random sets with |gap change| >= "
            f"the top heads': {c.p_random:.3f}"]
