"""The head atlas: per-head means and spreads against a plain pandas computation, the labels on
constructed statistics (each rule, their order, configurable thresholds), and `attnpipe heads`."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from attnpipe.errors import ReadError
from attnpipe.read import open_dataset
from attnpipe.read.heads import STATS, Rules, head_atlas, label_heads, load_rules
from attnpipe.store import committed_files

from conftest import invoke


def test_atlas_equals_plain_pandas(data):
    rows = pd.concat([pq.read_table(f).to_pandas() for f in committed_files(data["dense"], "head_stats")])
    grouped = rows.groupby(["layer", "head"])
    atlas = head_atlas(open_dataset(data["dense"])).set_index(["layer", "head"])
    assert len(atlas) == 2 * 4  # 2 layers x 4 heads of the tiny model
    windows = rows.groupby(["doc_id", "window_index"]).ngroups
    assert (atlas["windows"] == windows).all()  # every window counted once per head
    for stat in STATS:
        np.testing.assert_allclose(atlas[stat], grouped[stat].mean().loc[atlas.index], rtol=1e-6)
        np.testing.assert_allclose(atlas[f"{stat}_std"], grouped[stat].std(ddof=1).loc[atlas.index], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(atlas["window_tokens"], grouped["window_tokens"].mean().loc[atlas.index])


def _stats(**given) -> dict:
    """A head's mean statistics: a spread-out, unremarkable head unless told otherwise."""
    base = {"entropy_norm": 0.6, "first_mass": 0.1, "sep_mass": 0.05, "special_mass": 0.15, "self_mass": 0.1,
            "prev_mass": 0.1, "next_mass": 0.1, "punct_mass": 0.1, "mean_distance": 6.0, "entropy": 2.0}
    return {**base, **given}


CASES = [
    (_stats(prev_mass=0.8, entropy_norm=0.1), "previous", "positional"),
    (_stats(next_mass=0.55), "next", "positional"),
    (_stats(self_mass=0.7), "self", "positional"),
    (_stats(first_mass=0.7, special_mass=0.75, entropy_norm=0.2), "first-token", "vertical"),
    (_stats(sep_mass=0.6, special_mass=0.65), "separator", "vertical"),
    (_stats(punct_mass=0.45), "punctuation", "vertical"),
    (_stats(first_mass=0.3, sep_mass=0.3, special_mass=0.6), "special", "special"),
    (_stats(entropy_norm=0.93), "broad", "broad"),
    (_stats(mean_distance=1.4), "local", "local"),
    (_stats(entropy_norm=0.2), "focused", "focused"),
    (_stats(), "mixed", "mixed"),
    # order: positional before vertical, vertical before focused, broad before local
    (_stats(prev_mass=0.6, first_mass=0.6), "previous", "positional"),
    (_stats(entropy_norm=0.9, mean_distance=1.0), "broad", "broad"),
]


@pytest.mark.parametrize("stats, label, family", CASES, ids=[c[1] + str(i) for i, c in enumerate(CASES)])
def test_labels_on_constructed_stats(stats, label, family):
    frame = pd.DataFrame([{"layer": 0, "head": 0, **stats}])
    out = label_heads(frame, Rules())
    assert out["label"][0] == label
    assert out["family"][0] == family
    assert out["evidence"][0]  # says which numbers decided


def test_thresholds_are_configurable(tmp_path):
    frame = pd.DataFrame([{"layer": 0, "head": 0, **_stats(prev_mass=0.45)}])
    assert label_heads(frame, Rules())["label"][0] == "mixed"
    assert label_heads(frame, Rules(positional=0.4))["label"][0] == "previous"
    toml = tmp_path / "rules.toml"
    toml.write_text("positional = 0.4\nbroad_entropy = 0.7\n")
    assert load_rules(toml) == Rules(positional=0.4, broad_entropy=0.7)
    js = tmp_path / "rules.json"
    js.write_text(json.dumps({"rules": {"local_distance": 3}}))
    assert load_rules(js).local_distance == 3.0
    assert load_rules(None, focused_entropy=0.1).focused_entropy == 0.1
    bad = tmp_path / "bad.toml"
    bad.write_text("positionl = 0.4\n")
    with pytest.raises(ReadError, match="unknown head rule 'positionl'.*positional"):
        load_rules(bad)
    bad.write_text('positional = "high"\n')
    with pytest.raises(ReadError, match="must be a number"):
        load_rules(bad)
    bad.write_text("positional = \n")
    with pytest.raises(ReadError, match="not valid TOML"):
        load_rules(bad)


def test_heads_cli_formats(data, tmp_path):
    atlas = head_atlas(open_dataset(data["dense"]))
    table = invoke("heads", data["dense"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["layer", "head", "label"] and "entropy" in lines[0]
    assert "±" in lines[2]
    assert len(lines) == 2 + len(atlas) + 1
    csv = pd.read_csv(io.StringIO(invoke("heads", data["dense"], "--format", "csv").output))
    assert list(csv.columns) == list(atlas.columns)
    np.testing.assert_allclose(csv["entropy_norm"], atlas["entropy_norm"], rtol=1e-9)
    js = json.loads(invoke("heads", data["dense"], "--format", "json").output)
    assert [r["label"] for r in js] == atlas["label"].tolist()
    assert {"first_mass", "first_mass_std", "evidence", "family"} <= set(js[0])
    rules = tmp_path / "r.toml"
    rules.write_text("broad_entropy = 0.0\npositional = 1\nfixed_token = 1\npunctuation = 1\nspecial = 1\n")
    everything_broad = json.loads(invoke("heads", data["dense"], "--format", "json", "--rules", rules).output)
    assert {r["label"] for r in everything_broad} == {"broad"}
    out = tmp_path / "atlas.csv"
    assert invoke("heads", data["dense"], "--format", "csv", "-o", out).exit_code == 0
    assert len(pd.read_csv(out)) == len(atlas)


def test_heads_without_head_stats_says_which_recipe(data):
    result = invoke("heads", data["sparse"])
    assert result.exit_code == 1
    assert "head_stats recipe" in result.output and "Traceback" not in result.output
