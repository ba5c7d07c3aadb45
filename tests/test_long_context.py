"""Long windows on the torch path: a window's queries a block at a time (reduce.query_blocks)
store what the whole window stores, on every architecture, padding in the batch, from both
backends; no (T, T) float mask is formed on the sdpa backend; the window is what the model
states; recipes that need whole maps are refused up front when a window's map does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnpipe import reduce as reduce_module
from attnpipe.recipes import validate_recipe
from attnpipe.reduce import reduce_batch
from attnpipe.windows import tokenize

from conftest import ARCHS, loaded

BLOCKED = [validate_recipe(r, "test") for r in (
    {"name": "head_stats"}, {"name": "topk", "k": 3}, {"name": "topk", "k": 2, "per_head": False},
    {"name": "threshold", "t": 0.2}, {"name": "topp", "p": 0.5, "per_head": False},
    {"name": "dense", "max_tokens": 64})]
TEXTS = ["The animal didn't cross the street because it was too tired.", "Tiny.",
         " ".join(f"Sentence {i} is about the river and the mill." for i in range(8))]


def _rows(columns: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    """The columns with rows in a canonical order (blocks emit rows block by block)."""
    if "weights.values" in columns:  # dense: rows and their value runs move together
        lengths = columns["weights.lengths"]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        order = np.lexsort([columns[k] for k in reversed(keys) if k in columns])
        values = np.concatenate([columns["weights.values"][s: s + n] for s, n in zip(starts[order], lengths[order])])
        return {**{k: v[order] for k, v in columns.items() if k != "weights.values"}, "weights.values": values}
    order = np.lexsort([columns[k] for k in reversed(keys) if k in columns])
    return {k: v[order] for k, v in columns.items()}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_query_blocks_store_what_the_whole_window_stores(arch, backend, tokenizer, monkeypatch):
    lm, _ = loaded(arch, tokenizer)
    lm.backend = backend
    windows = tokenize(tokenizer, TEXTS, 64, 8)
    assert len({len(w) for w in windows}) > 1  # padding in the batch
    monkeypatch.setattr(reduce_module, "CPU_SLICE_BYTES", 1 << 40)
    monkeypatch.setattr(reduce_module, "KERNEL_BLOCK_BYTES", 1 << 40)
    whole = reduce_batch(lm, windows, BLOCKED)
    calls = []
    original = reduce_module.query_blocks
    monkeypatch.setattr(reduce_module, "CPU_SLICE_BYTES", 1)
    monkeypatch.setattr(reduce_module, "KERNEL_BLOCK_BYTES", 1)  # the compiled kernel's blocks
    monkeypatch.setattr(reduce_module, "query_blocks", lambda *a: calls.append(a) or original(*a))
    blocked = reduce_batch(lm, windows, BLOCKED)
    assert any(original(*a) is not None and len(original(*a)) > 1 for a in calls)  # more than one block ran
    assert [(o.recipe, o.layer, o.site) for o in whole] == [(o.recipe, o.layer, o.site) for o in blocked]
    for a, b in zip(whole, blocked):
        keys = ["batch_index", "head", "query_pos", "key_pos"]
        x, y = _rows(a.columns, keys), _rows(b.columns, keys)
        assert x.keys() == y.keys()
        for name, col in x.items():
            if col.dtype.kind == "f":  # sums over the queries in another order: float32 rounding
                np.testing.assert_allclose(col, y[name], rtol=1e-6, atol=2e-6, err_msg=f"{BLOCKED[a.recipe]} {name}")
            else:
                np.testing.assert_array_equal(col, y[name], err_msg=f"{BLOCKED[a.recipe]} {name}")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_sdpa_takes_no_float_mask_and_matches_eager(arch, tokenizer):
    """On the sdpa backend a window without padding reaches the recipes with no mask (SDPA's
    is_causal does causality), a padded batch with SDPA's boolean mask; the probabilities are
    eager's either way."""
    from attnpipe.capture import capture_layers
    from attnpipe.windows import collate

    from conftest import eager_attentions

    lm, reference = loaded(arch, tokenizer)
    for texts in (TEXTS[:1], TEXTS):
        ids, mask = collate(tokenize(tokenizer, texts, 64, 8), lm.pad_id)
        seen = []
        with capture_layers(seen.append, backend="sdpa", model=lm.model):
            lm.forward(ids, mask)
        expected = eager_attentions(reference, ids, mask)
        for inputs, want in zip(seen, expected):
            assert inputs.mask is None or inputs.mask.dtype == torch.bool, inputs.mask.dtype
            if len(texts) == 1:
                assert inputs.mask is None and inputs.implied_causal == lm.causal
            valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
            torch.testing.assert_close(inputs.probs * valid, want * valid, atol=1e-6, rtol=1e-5)
            blocks = torch.cat([inputs.probs_rows(0, len(ids), q0, q0 + 5) for q0 in range(0, ids.shape[1], 5)], 2)
            torch.testing.assert_close(blocks, inputs.probs, atol=1e-7, rtol=0)


def _long_model_dir(tmp_path, tokenizer, positions: int = 8192):
    """A tiny Llama (GQA) folder whose config and tokenizer state `positions` positions."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions))
    folder = tmp_path / "long-llama"
    model.save_pretrained(folder)
    tokenizer.model_max_length = positions
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = 512
    return folder


def test_a_window_beyond_4096_tokens_runs_in_blocks(tmp_path, tokenizer, monkeypatch):
    """No hidden cap: model.max_length takes what the model states (8192 here), the default
    window stays 4096 and says why, and a 5,000-token window runs on the CPU with its queries in
    blocks: head statistics over every query, edges up to the last position."""
    import json

    import pyarrow.parquet as pq

    from attnpipe.executor.local import run_job
    from attnpipe.job import load_job
    from attnpipe.model import load_model

    from conftest import write_job

    folder = _long_model_dir(tmp_path, tokenizer)
    lm = load_model(str(folder), device="cpu")
    assert lm.max_length == 8192
    assert lm.default_window == (4096, "attnpipe's default of 4096 tokens; the model takes up to 8192 "
                                       "(set model.max_length for longer windows)")
    assert lm.check_window(8192, 0) == 8192
    corpus = tmp_path / "long.jsonl"
    corpus.write_text(json.dumps({"id": "long", "text": " ".join(["river"] * 5200)}) + "\n")
    job = write_job(tmp_path, corpus, folder, device="cpu", batch_tokens=8192,
                    recipes='[[recipes]]\nname = "head_stats"\n[[recipes]]\nname = "topk"\nk = 2\n')
    job.write_text(job.read_text().replace("max_length = 64", "max_length = 5000").replace("stride = 8", "stride = 0"))
    calls = []
    original = reduce_module.query_blocks
    monkeypatch.setattr(reduce_module, "query_blocks", lambda *a: calls.append(original(*a)) or calls[-1])
    result = run_job(load_job(job), quiet=True)
    assert sum(c is not None and len(c) > 1 for c in calls) == 2  # the 5,000-token window's two layers
    stats = pq.read_table(next((result.output / "head_stats").rglob("*.parquet"))).to_pandas()
    assert set(stats["window_tokens"]) >= {5000}
    edges = pq.read_table(next((result.output / "edges").rglob("*.parquet")), columns=["query_pos", "key_pos"])
    assert edges["query_pos"].to_numpy().max() == 4999
    assert (edges["key_pos"].to_numpy() <= edges["query_pos"].to_numpy()).all()  # causal


def test_recipes_that_need_whole_maps_are_refused_before_the_run(tmp_path, tokenizer, monkeypatch):
    from attnpipe import hostmem

    from conftest import error_line, invoke, write_job

    folder = _long_model_dir(tmp_path, tokenizer)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "river mill town"}\n')
    monkeypatch.setattr(hostmem, "available_bytes", lambda device: 1 << 30)
    job = write_job(tmp_path, corpus, folder, device="cpu",
                    recipes='[[recipes]]\nname = "topk"\n[[recipes]]\nname = "rollout"\n')
    job.write_text(job.read_text().replace("max_length = 64", "max_length = 8192"))
    line = error_line(invoke("run", job))
    # (2 * 4 heads + 4) x 8192^2 x 4 bytes = 3.0 GiB; 80% of 1 GiB fits 4230 tokens
    assert "rollout needs each layer's whole (4, T, T) attention map: a 8192-token window takes about 3.0 GiB" in line
    assert "set model.max_length to at most 4230" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
    job.write_text(job.read_text().replace("max_length = 8192", "max_length = 4230"))
    assert invoke("run", job).exit_code == 0
    job.write_text(job.read_text().replace('name = "rollout"', 'name = "head_stats"').replace("4230", "8192")
                   .replace(str(tmp_path / "out"), str(tmp_path / "out2")))
    done = invoke("run", job)
    assert done.exit_code == 0, done.output  # blocked recipes take any length
