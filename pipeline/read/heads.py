"""The head atlas: what each (layer, head) does on average over the corpus, and a label for it.

Each statistic of `head_stats` (one row per window x layer x head, already a mean over the
window's query tokens) is averaged over windows, every window weighted equally, as Clark et al.
(2019) averaged over their sentences; `<stat>_std` is its standard deviation across windows.

Labels use normalised entropy (entropy / ln(number of keys the query sees), 0 = all on one key,
1 = uniform), never Clark et al.'s absolute 3.8 nats, which sentences shorter than about
45 tokens (ln 45 = 3.8) cannot reach. The rules are tried in this order; the first that matches
names the head (`label`), its family (`family`) and the numbers that decided (`evidence`):

  positional  previous / next / self   prev_mass, next_mass or self_mass >= positional  (0.5)
  vertical    first-token / separator  first_mass or sep_mass >= fixed_token            (0.5)
              punctuation              punct_mass >= punctuation                        (0.4)
  special     special                  special_mass >= special (all special tokens)     (0.5)
  broad       broad                    entropy_norm >= broad_entropy                    (0.85)
  local       local                    mean_distance <= local_distance tokens           (2.0)
  focused     focused                  entropy_norm <= focused_entropy, no fixed target (0.35)
  mixed       mixed                    none of the above

Every threshold can be changed: `Rules(positional=0.4)`, or a TOML/JSON file of the same keys
(`attnpipe heads OUT --rules rules.toml`).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import ReadError

# The statistics of the atlas, in display order (all columns of head_stats).
STATS = ("entropy_norm", "first_mass", "sep_mass", "special_mass", "self_mass", "prev_mass",
         "next_mass", "punct_mass", "mean_distance", "entropy")

# Short names for grid annotations and compact tables.
SHORT = {"previous": "prev", "next": "next", "self": "self", "first-token": "first",
         "separator": "sep", "punctuation": "punct", "special": "spec", "broad": "broad",
         "local": "local", "focused": "focus", "mixed": ""}


@dataclass(frozen=True)
class Rules:
    """Thresholds of the head labels (see the module docstring for the order of the rules)."""

    positional: float = 0.5        # mass on the previous / next token or on itself (Clark et al.: > 0.5)
    fixed_token: float = 0.5       # mass on one fixed token: position 0 ([CLS]/BOS) or separators
    punctuation: float = 0.4       # mass on punctuation tokens
    special: float = 0.5           # mass on all special tokens together
    broad_entropy: float = 0.85    # normalised entropy at least this: attention spread nearly uniformly
    local_distance: float = 2.0    # mean |query_pos - key_pos| at most this many tokens
    focused_entropy: float = 0.35  # normalised entropy at most this, with no fixed target above


# Thresholds on fractions (masses, normalised entropy) lie in [0, 1]; the distance is in tokens.
FRACTIONS = ("positional", "fixed_token", "punctuation", "special", "broad_entropy", "focused_entropy")


def load_rules(path: str | Path | None = None, **overrides) -> Rules:
    """Rules from a TOML or JSON file of threshold keys (and/or keyword overrides)."""
    values = _read_rules(Path(path)) if path is not None else {}
    values.update(overrides)
    where = f" in {path}" if path else ""
    known = {f.name for f in fields(Rules)}
    for key, value in values.items():
        if key not in known:
            raise ReadError(f"unknown head rule {key!r}{where}; rules: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ReadError(f"head rule {key}{where} must be a number, got {value!r}")
        if key in FRACTIONS and not 0 <= value <= 1:
            raise ReadError(f"head rule {key}{where} is a fraction: give a number from 0 to 1, got {value!r}")
        if key == "local_distance" and value <= 0:
            raise ReadError(f"head rule {key}{where} is a distance in tokens: give a number above 0, got {value!r}")
    return replace(Rules(), **{k: float(v) for k, v in values.items()})


def _read_rules(path: Path) -> dict:
    """The threshold keys of a rules file: a table of them, or under [rules]."""
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except OSError as exc:
        raise ReadError(f"cannot read rules file {path}: {exc.strerror or exc}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ReadError(f"rules file {path} is not valid {kind}: {exc}") from None
    values = values.get("rules", values) if isinstance(values, dict) else values
    if not isinstance(values, dict):
        raise ReadError(f"rules file {path} must hold a table of thresholds (e.g. positional = 0.5), "
                        f"got a {type(values).__name__}")
    return dict(values)


def atlas_sql(params: str | None = None, sites: bool = False, steps: bool = False) -> str:
    """One row per (layer, head): windows, and the mean and sample std of every statistic; with
    `sites`, one atlas per attention kind: rows per (stack, attention, layer, head). Statistics
    a kind does not define (cross-attention's self/prev/next/distance) stay null. With `steps`
    (schema v4 data, whose generate runs add one row per decoding step) only the windows' rows
    count: the prompt's, as in a forward run."""
    cols = ",\n  ".join(f"avg({s}) AS {s}, CASE WHEN count({s}) > 0 THEN coalesce(stddev_samp({s}), 0) END AS {s}_std"
                        for s in STATS)
    conditions = ([] if params is None else ["recipe_params = '" + params.replace("'", "''") + "'"]) + \
        (["step IS NULL"] if steps else [])
    where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
    keys = "stack, attention, layer, head" if sites else "layer, head"
    return (f"SELECT {keys}, count(*) AS windows, avg(window_tokens) AS window_tokens,\n  {cols}\n"
            f"FROM head_stats {where}\nGROUP BY {keys} ORDER BY {keys}")


def head_atlas(ds, rules: Rules | None = None, params: str | None = None):
    """The atlas of a dataset as a pandas DataFrame: layer, head, label, family, evidence,
    windows, window_tokens, then <stat> and <stat>_std for each of STATS."""
    if "head_stats" not in ds.tables:
        raise ReadError(f"{ds.path} has no head_stats table: add the head_stats recipe to the job "
                        "(it is in the default recipe set) and run it")
    found = ds.sql("SELECT DISTINCT recipe_params FROM head_stats")["recipe_params"].tolist()
    if params is None and len(found) > 1:
        raise ReadError(f"head_stats holds rows of {len(found)} parameter sets ({', '.join(found)}); choose one")
    columns = ds.sql("SELECT * FROM head_stats LIMIT 0").columns
    # Several attention kinds (an encoder-decoder's): one atlas each. One kind (and v2 data,
    # which has no sites) keeps the plain (layer, head) atlas.
    kinds = "stack" in columns and len(ds.sql("SELECT DISTINCT stack, attention FROM head_stats")) > 1
    atlas = ds.sql(atlas_sql(params, sites=kinds, steps="step" in columns))
    return label_heads(atlas, rules or Rules())


def label_heads(atlas, rules: Rules):
    """Add label, family and evidence columns to a frame of per-head means (columns of STATS)."""
    decided = [_label(row, rules) for row in atlas.to_dict("records")]
    out = atlas.copy()
    at = list(out.columns).index("head") + 1
    out.insert(at, "label", [d[0] for d in decided])
    out.insert(at + 1, "family", [d[1] for d in decided])
    out.insert(at + 2, "evidence", [d[2] for d in decided])
    return out


def _label(s: dict, r: Rules) -> tuple[str, str, str]:
    """(label, family, evidence) of one head's mean statistics: the first rule that matches
    (a rule on a statistic the head's kind does not define, null, never matches)."""
    s = {k: (math.nan if v is None else v) for k, v in s.items()}
    positional = max((s["prev_mass"], "previous", "prev_mass"), (s["next_mass"], "next", "next_mass"),
                     (s["self_mass"], "self", "self_mass"))
    if positional[0] >= r.positional:
        return positional[1], "positional", f"{positional[2]} {positional[0]:.2f} >= {r.positional:g}"
    fixed = max((s["first_mass"], "first-token", "first_mass"), (s["sep_mass"], "separator", "sep_mass"))
    if fixed[0] >= r.fixed_token:
        return fixed[1], "vertical", f"{fixed[2]} {fixed[0]:.2f} >= {r.fixed_token:g}"
    if s["punct_mass"] >= r.punctuation:
        return "punctuation", "vertical", f"punct_mass {s['punct_mass']:.2f} >= {r.punctuation:g}"
    if s["special_mass"] >= r.special:
        return "special", "special", f"special_mass {s['special_mass']:.2f} >= {r.special:g}"
    if s["entropy_norm"] >= r.broad_entropy:
        return "broad", "broad", f"entropy_norm {s['entropy_norm']:.2f} >= {r.broad_entropy:g}"
    if s["mean_distance"] <= r.local_distance:
        return "local", "local", f"mean_distance {s['mean_distance']:.2f} <= {r.local_distance:g}"
    if s["entropy_norm"] <= r.focused_entropy:
        return "focused", "focused", f"entropy_norm {s['entropy_norm']:.2f} <= {r.focused_entropy:g}"
    return "mixed", "mixed", "no rule matched"


def display_frame(atlas, stats=STATS[:-1]):
    """The atlas for people: 'mean ± std' per statistic, short column names."""
    import pandas as pd

    shown = {"layer": atlas["layer"], "head": atlas["head"], "label": atlas["label"]}
    if "stack" in atlas.columns:  # one atlas per attention kind
        shown = {"site": atlas["stack"] + "-" + atlas["attention"], **shown}
    for s in stats:
        name = s.replace("_mass", "").replace("entropy_norm", "entropy").replace("mean_distance", "distance")
        fmt = "{:.1f}±{:.1f}" if s == "mean_distance" else "{:.2f}±{:.2f}"
        shown[name] = ["null" if m is None or m != m else fmt.format(m, d) for m, d in zip(atlas[s], atlas[f"{s}_std"])]
    return pd.DataFrame(shown)
