"""Small datasets for the read-side tests (test_read, test_heads, test_plots, test_report),
written once per test session by real runs of a tiny random-init BERT (2 layers x 4 heads).

- "dense": head_stats, topk per head and on the head mean, threshold, rollout and dense maps of
  every head; 2 shards; one document long enough for two windows.
- "sparse": topk per head and rollout only: no maps (plots fall back to edges), no head_stats.
"""

from __future__ import annotations

import json
from pathlib import Path

from attnpipe.executor.local import run_job
from attnpipe.job import load_job

from conftest import write_job

TEXTS = {
    "d-anim": "The animal didn't cross the street because it was too tired.",
    "d-cats": "Why do cats purr?",
    "d-rain": "Rain fell all night; by morning the road was a well-known river.",
    "d-long": " ".join(["Glass was expensive, and large windows let out precious heat."] * 8),
    "d-mill": "The mill stood by the river.",
}
DENSE = """
[[recipes]]
name = "head_stats"
[[recipes]]
name = "topk"
k = 3
per_head = true
[[recipes]]
name = "topk"
k = 3
per_head = false
[[recipes]]
name = "threshold"
t = 0.2
per_head = false
[[recipes]]
name = "rollout"
k = 3
[[recipes]]
name = "dense"
max_tokens = 64
per_head = true
"""
SPARSE = """
[[recipes]]
name = "topk"
k = 3
per_head = true
[[recipes]]
name = "rollout"
k = 3
"""


def corpus(folder: Path) -> Path:
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in TEXTS.items()))
    return path


def datasets(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """{"dense": OUT, "sparse": OUT}; conftest's session fixture `data` calls this once."""
    model = tiny_model_dir("bert")
    built = {}
    for name, recipes, shards in (("dense", DENSE, 2), ("sparse", SPARSE, 1)):
        folder = tmp_path_factory.mktemp(f"read-{name}")
        job = write_job(folder, corpus(folder), model, recipes=recipes, extra='id_column = "id"',
                        device="cpu", num_shards=shards)
        run_job(load_job(job), quiet=True)
        built[name] = folder / "out"
    return built
