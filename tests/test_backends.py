"""The attention backends give the same data: a whole run with the layer outputs from SDPA
(probabilities recomputed from q and k once per layer) equals one on the model's eager attention,
on an encoder and on a causal GQA model, with every recipe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from attnpipe.executor.local import run_job
from attnpipe.job import load_job
from attnpipe.store import committed_files, read_records

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


def run_backends(tmp_path, model, recipes: str, backends: tuple[str, ...]) -> dict:
    """The same job (float32 storage) run once per attention backend: backend -> output."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    outs = {}
    for backend in backends:
        folder = tmp_path / backend
        folder.mkdir()
        job = write_job(folder, corpus, model, recipes=recipes, device="cpu", attention=backend,
                        weight_dtype="float32")
        outs[backend] = run_job(load_job(job), quiet=True).output
    return outs


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_sdpa_and_eager_runs_store_the_same_data(tmp_path, tiny_model_dir, arch):
    outs = run_backends(tmp_path, tiny_model_dir(arch), RECIPES, ("eager", "sdpa"))
    prov = {b: read_records(o)[0]["provenance"]["attention_backend"] for b, o in outs.items()}
    assert prov == {"eager": "attnpipe(eager)", "sdpa": "attnpipe(sdpa)"}
    assert_same_tables(outs["eager"], outs["sdpa"])


def assert_same_tables(one, other, tables=("head_stats", "edges", "rollout", "maps")) -> None:
    """Integer and string columns equal, attention values within 1e-5 (float32 storage)."""
    for table in tables:
        a, b = rows(one, table), rows(other, table)
        assert len(a) == len(b), table
        for col in a.columns:
            if col == "weights":
                np.testing.assert_allclose(np.concatenate(a[col].to_list()), np.concatenate(b[col].to_list()),
                                           atol=1e-5)
            elif a[col].dtype.kind == "f":
                np.testing.assert_allclose(a[col], b[col], atol=1e-5, err_msg=f"{table}.{col}")
            else:  # nulls (generate runs' step and segment, null elsewhere) compare equal
                assert a[col].reset_index(drop=True).equals(b[col].reset_index(drop=True)), f"{table}.{col}"


def test_out_of_memory_halves_the_batch_and_reports_it(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """CUDA running out of memory on a batch of more than one window: the batch is halved and
    retried (recursively), the rows are those of a run without the error, and the run says so.
    Simulated on the CPU: the step only sees torch.OutOfMemoryError."""
    import logging

    import torch

    from attnpipe import shard as shard_module
    from attnpipe.errors import ModelError

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    model = tiny_model_dir("bert")

    def run(folder):
        folder.mkdir()
        job = write_job(folder, corpus, model, recipes=RECIPES, device="cpu", weight_dtype="float32")
        return run_job(load_job(job), quiet=True).output

    clean = run(tmp_path / "clean")
    real = shard_module.reduce_batch_async

    def tight(lm, windows, recipes):
        if len(windows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, windows, recipes)

    monkeypatch.setattr(shard_module, "reduce_batch_async", tight)
    with caplog.at_level(logging.WARNING, logger="attnpipe"):
        halved = run(tmp_path / "halved")
    assert any("ran out of memory" in r.getMessage() and "halved" in r.getMessage() for r in caplog.records)
    assert_same_tables(clean, halved)

    monkeypatch.setattr(shard_module, "reduce_batch_async",
                        lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(ModelError) as info:
        run(tmp_path / "never")
    assert "does not fit in GPU memory" in str(info.value) and "\n" not in str(info.value)


FUSED_RECIPES = ('[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 3\n'
                 '[[recipes]]\nname = "topk"\nk = 4\nper_head = false\n[[recipes]]\nname = "threshold"\nt = 0.2\n')


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_fused_backend_stores_what_the_torch_recipes_store(tmp_path, tiny_model_dir, arch, monkeypatch):
    """The fused backend (SDPA output; head_stats and topk from the kernels' API on q and k,
    here its torch reference) against the eager torch recipes, with padding, causal masks and
    GQA. Per-head threshold falls back to P computed from q and k."""
    from attnpipe import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)  # the reference implementation
    outs = run_backends(tmp_path, tiny_model_dir(arch), FUSED_RECIPES, ("eager", "fused"))
    assert read_records(outs["fused"])[0]["provenance"]["attention_backend"] == "attnpipe(fused:reference)"
    assert_same_tables(outs["eager"], outs["fused"], tables=("head_stats", "edges"))
