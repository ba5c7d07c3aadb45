"""The attention backends give the same data: a whole run with the layer outputs from SDPA
(probabilities recomputed from q and k once per layer) equals one on the model's eager attention,
on an encoder and on a causal GQA model, with every recipe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.executor.local import run_job
from pipeline.job import load_job
from pipeline.store import committed_files, read_records

from conftest import write_job

RECIPES = "".join(f'[[recipes]]\nname = "{n}"\n{extra}' for n, extra in [
    ("head_stats", ""), ("topk", "k = 3\n"), ("topk", "k = 2\nper_head = false\n"), ("threshold", "t = 0.2\n"),
    ("topp", "p = 0.5\nper_head = false\n"), ("rollout", "k = 3\n"), ("dense", "max_tokens = 16\n")])
TEXTS = ["The animal didn't cross the street because it was too tired.", "Tiny.",
         " ".join(f"Sentence {i} is about the river and the mill." for i in range(12))]


def rows(out, table):
    data = [pq.read_table(f).to_pandas() for f in committed_files(out, table)]
    frame = pd.concat(data)
    keys = [c for c in ("doc_id", "window_index", "layer", "head", "query_pos", "key_pos", "recipe_params")
            if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_sdpa_and_eager_runs_store_the_same_data(tmp_path, tiny_model_dir, arch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    outs = {}
    for backend in ("eager", "sdpa"):
        folder = tmp_path / backend
        folder.mkdir()
        job = write_job(folder, corpus, tiny_model_dir(arch), recipes=RECIPES, device="cpu",
                        attention=backend, weight_dtype="float32")
        outs[backend] = run_job(load_job(job), quiet=True).output
    prov = {b: read_records(o)[0]["provenance"]["attention_backend"] for b, o in outs.items()}
    assert prov == {"eager": "attnpipe(eager)", "sdpa": "attnpipe(sdpa)"}
    for table in ("head_stats", "edges", "rollout", "maps"):
        a, b = rows(outs["eager"], table), rows(outs["sdpa"], table)
        assert len(a) == len(b), table
        for col in a.columns:
            if col == "weights":
                np.testing.assert_allclose(np.concatenate(a[col].to_list()), np.concatenate(b[col].to_list()),
                                           atol=1e-5)
            elif a[col].dtype.kind == "f":
                np.testing.assert_allclose(a[col], b[col], atol=1e-5, err_msg=f"{table}.{col}")
            else:
                assert (a[col].to_numpy() == b[col].to_numpy()).all(), f"{table}.{col}"
