"""Recipe variants in one table are told apart by `recipe_label`, in files, filters and SQL; and
the storage precision the README states holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import invoke, write_job

from attnpipe.read import open_dataset
from attnpipe.recipes import RECIPES, recipe_id, validate_recipe
from attnpipe.store.paths import recipe_label

VARIANTS = ('[[recipes]]\nname = "topk"\nk = 2\nper_head = false\n'
            '[[recipes]]\nname = "topk"\nk = 3\n'
            '[[recipes]]\nname = "threshold"\nt = 0.05\n'
            '[[recipes]]\nname = "head_stats"\n')


@pytest.mark.parametrize("spec, label", [
    ({"name": "topk", "k": 8, "per_head": False}, "topk_k8_mean"),
    ({"name": "topk", "k": 8, "per_head": True}, "topk_k8"),
    ({"name": "threshold", "t": 0.05}, "threshold_t0p05"),
    ({"name": "topp", "p": 0.9, "per_head": False}, "topp_p0p9_mean"),
    ({"name": "rollout", "k": 8}, "rollout_k8"),
    ({"name": "dense", "max_tokens": 64, "per_head": True}, "dense_max64"),
    ({"name": "head_stats"}, "head_stats"),
])
def test_labels_are_short_and_sql_safe(spec, label):
    full = validate_recipe(spec, "test")
    assert recipe_label(full["name"], {k: v for k, v in full.items() if k != "name"}) == label
    assert label.isidentifier()


def test_labels_are_one_per_recipe_id():
    specs = [validate_recipe({"name": n, **p}, "t") for n in RECIPES for p in (
        [{}] if not RECIPES[n].params.model_fields else
        [{"per_head": h} for h in (True, False)] if "per_head" in RECIPES[n].params.model_fields else [{}])]
    specs += [validate_recipe({"name": "threshold", "t": t}, "t") for t in (0.1, 0.01, 0.001, 1e-5, 0.25)]
    labels = {recipe_label(s["name"], {k: v for k, v in s.items() if k != "name"}) for s in specs}
    assert len(labels) == len({recipe_id(s) for s in specs})


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("labels")
    corpus = tmp / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The animal didn't cross the street because it was too tired.", "Why do cats purr?")))
    job = write_job(tmp, corpus, model=tiny_model_dir("bert"), recipes=VARIANTS, device="cpu")
    assert invoke("run", job, "-q").exit_code == 0
    return open_dataset(tmp / "out")


def test_variants_in_one_table_have_their_labels(variants):
    edges = variants.to_pandas("edges", columns=["recipe_label", "recipe", "recipe_params", "head"])
    assert set(edges.recipe_label) == {"topk_k2_mean", "topk_k3", "threshold_t0p05"}
    for label, group in edges.groupby("recipe_label"):
        assert group.recipe_params.nunique() == 1  # one label, one parameter set
    mean_only = variants.to_pandas("edges", filter={"recipe_label": "topk_k2_mean"})
    assert (mean_only["head"] == -1).all() and len(mean_only)
    assert set(variants.to_pandas("head_stats", columns=["recipe_label"]).recipe_label) == {"head_stats"}


def test_bfloat16_storage_error_is_within_the_stated_bound(tmp_path, tiny_model_dir):
    """README: bfloat16 storage rounds to nearest with 8 significant bits, so the relative
    error is at most 2^-8 (and does reach past 2^-9)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"text number {i} with a few more words in it"}) + "\n"
                              for i in range(6)))
    dense = '[[recipes]]\nname = "dense"\nmax_tokens = 64\n'
    values = {}
    for dtype in ("bfloat16", "float32"):
        (tmp_path / dtype).mkdir()
        job = write_job(tmp_path / dtype, corpus, model=tiny_model_dir("bert"), recipes=dense, device="cpu",
                        weight_dtype=dtype)
        assert invoke("run", job, "-q").exit_code == 0
        maps = open_dataset(tmp_path / dtype / "out").to_pandas("maps").sort_values(
            ["doc_id", "layer", "head", "query_pos"])
        values[dtype] = np.concatenate([np.asarray(w, dtype=np.float64) for w in maps.weights])
    exact, stored = values["float32"], values["bfloat16"]
    nonzero = exact > 0
    rel = np.abs(stored[nonzero] - exact[nonzero]) / exact[nonzero]
    assert rel.max() <= 2.0 ** -8
    assert rel.max() > 2.0 ** -9


def test_sql_has_a_view_per_recipe_label(variants):
    views = set(variants.sql("SHOW TABLES")["name"])
    assert {"topk_k2_mean", "topk_k3", "threshold_t0p05"} <= views
    for label in ("topk_k2_mean", "topk_k3", "threshold_t0p05"):
        n = variants.sql(f"SELECT count(*) AS n FROM {label}").n[0]
        assert n == variants.sql(f"SELECT count(*) AS n FROM edges WHERE recipe_label = '{label}'").n[0] > 0
    assert variants.recipe_labels["head_stats"] == "head_stats"  # the table itself, no second view
    tokens = variants.sql("SELECT DISTINCT recipe_label FROM edges_tokens ORDER BY 1")
    assert list(tokens.recipe_label) == ["threshold_t0p05", "topk_k2_mean", "topk_k3"]
