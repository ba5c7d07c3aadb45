"""The compiled CPU kernel (kernels/cpu_attn.c) against plain torch on the same q, k, v.

Reference: P = softmax over each row's valid keys (padding and, causal, the future masked) in
float64; the output P V, the nine row statistics of kernels.reference.row_stats, the mean of P
over heads, P itself and the top keys of kernels.reference.row_topk, per head and on the mean. Tolerance 2e-5 absolute (float32 scores, the kernel's own exp; the
observed error is ~1e-6; mean_distance, which runs to ~100, 1e-5 relative). Shapes cover grouped-query heads, head dims that are not a multiple
of the vector width, one-token windows, a block of a long window's queries (offset), and
strided inputs as the capture hands them over (batch, pos, head, dim transposed).

Then the pipeline: reduce_batch with the kernel stores what the torch ops store, on every tiny
architecture, and the layer outputs the kernel computes are the model's.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from attnpipe import reduce as reduce_module
from attnpipe.kernels import cpu, reference
from attnpipe.recipes import validate_recipe
from attnpipe.recipes.compiled import CompiledAttention
from attnpipe.reduce import reduce_batch

from conftest import ARCHS, loaded
from test_cpu_path import SPECS, _padded_windows

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="no C compiler: the CPU kernel is not built")

TOL = 2e-5


def _inputs(batch, heads, kv_heads, size, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    # as the capture sees them: (batch, pos, head, dim) storage, (batch, head, pos, dim) views
    q = torch.randn(batch, size, heads, dim, generator=g).transpose(1, 2)
    k = torch.randn(batch, size, kv_heads, dim, generator=g).transpose(1, 2)
    v = torch.randn(batch, size, kv_heads, dim, generator=g).transpose(1, 2)
    return q, k, v


def _reference(q, k, v, lengths, causal, scaling, offset=0, keys=None):
    """(P float64 (batch, head, rows, keys) over valid keys, padded query rows included, output)."""
    batch, heads, rows, dim = q.shape
    keys = k.shape[2] if keys is None else keys
    rep = heads // k.shape[1]
    kk = k[:, :, :keys].double().repeat_interleave(rep, 1)
    vv = v[:, :, :keys].double().repeat_interleave(rep, 1)
    s = q.double() @ kk.transpose(-1, -2) * scaling
    key = torch.arange(keys)
    pos = torch.arange(offset, offset + rows)
    allowed = key[None, None, :] < lengths[:, None, None]  # (batch, 1, keys)
    if causal:
        allowed = allowed & (key[None, None, :] <= pos[None, :, None])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p, (p @ vv).transpose(1, 2)


CASES = [  # batch, heads, kv_heads, size, dim, causal, lengths
    (3, 4, 4, 37, 32, False, [37, 20, 1]),
    (2, 8, 2, 50, 24, True, [50, 33]),
    (4, 6, 3, 17, 64, True, [1, 17, 9, 4]),
    (1, 2, 1, 130, 40, False, [129]),
]


@pytest.mark.parametrize("batch,heads,kv_heads,size,dim,causal,lengths", CASES)
def test_kernel_matches_torch(batch, heads, kv_heads, size, dim, causal, lengths):
    q, k, v = _inputs(batch, heads, kv_heads, size, dim)
    lengths = torch.tensor(lengths)
    flags = torch.randint(0, 8, (batch, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    scaling = dim ** -0.5
    out = torch.full((batch, size, heads, dim), float("nan"))
    got = cpu.attention_rows(q, k, v, lengths, causal=causal, offset=0, scaling=scaling, flags=flags, out=out,
                             stats=True, mean=True, probs=True, topk_head=3, topk_mean=40)
    p, expected_out = _reference(q, k, v, lengths, causal, scaling)
    torch.testing.assert_close(out.double(), expected_out, atol=TOL, rtol=0)
    torch.testing.assert_close(got["probs"].double(), p, atol=TOL, rtol=0)
    torch.testing.assert_close(got["mean"].double(), p.mean(1), atol=TOL, rtol=0)
    lse = reference.row_lse(q, k, scaling=scaling, lengths=lengths, causal=causal)
    stats = reference.row_stats(q, k, lse, scaling=scaling, lengths=lengths, causal=causal, key_flags=flags)
    torch.testing.assert_close(got["stats"], stats, atol=TOL, rtol=1e-5)  # mean_distance runs to ~100
    for name, count, head_mean in (("topk_head", 3, False), ("topk_mean", 40, True)):  # 40: more than some rows have
        weight, position = reference.row_topk(q, k, lse, scaling=scaling, lengths=lengths, causal=causal,
                                              k_top=count, head_mean=head_mean)
        torch.testing.assert_close(got[name][0], weight, atol=TOL, rtol=0)
        assert torch.equal(got[name][1], position), name


def test_kernel_block_of_queries():
    """Rows 40..60 of a causal 90-token window, keys 0..60: what reduce_layer hands over for a
    block of a long window. The rows equal those of the whole window."""
    q, k, v = _inputs(2, 4, 2, 90, 32, seed=3)
    lengths = torch.tensor([90, 55])
    flags = torch.zeros(2, 90, dtype=torch.uint8)
    flags[:, 0] = 1
    whole_out = torch.empty(2, 90, 4, 32)
    whole = cpu.attention_rows(q, k, v, lengths, causal=True, offset=0, scaling=0.2, flags=flags, out=whole_out,
                               stats=True, mean=True, probs=True)
    block_out = torch.empty(2, 90, 4, 32)
    block = cpu.attention_rows(q[:, :, 40:60], k[:, :, :60], v[:, :, :60], lengths, causal=True, offset=40,
                               scaling=0.2, flags=flags[:, :60], out=block_out[:, 40:60], stats=True, mean=True,
                               probs=True)
    torch.testing.assert_close(block_out[:, 40:60], whole_out[:, 40:60], atol=1e-6, rtol=0)
    torch.testing.assert_close(block["stats"], whole["stats"][:, :, 40:60], atol=1e-6, rtol=0)
    torch.testing.assert_close(block["probs"], whole["probs"][:, :, 40:60, :60], atol=1e-6, rtol=0)
    torch.testing.assert_close(block["mean"], whole["mean"][:, 40:60, :60], atol=1e-6, rtol=0)
    assert not whole["probs"][:, :, 40:60, 60:].any()  # causal: no weight past the block's last query


def test_loading_the_kernel_keeps_subnormals():
    """The library must not switch the process to flush-to-zero (what -ffast-math's start-up code
    does to every caller of a shared library): torch's arithmetic on subnormals stays exact."""
    code = ("import torch; from attnpipe.kernels import cpu; x = torch.tensor([1e-39]); "
            "assert cpu.load() is not None; print((x * 1.5).item())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(done.stdout) == pytest.approx(1.5e-39, rel=1e-3)


def test_kernel_rejects_what_it_cannot_take():
    q, k, v = _inputs(1, 4, 4, 8, 16)
    with pytest.raises(ValueError, match="float32"):
        cpu.attention_rows(q.double(), k, v, torch.tensor([8]), causal=False, offset=0, scaling=1.0)
    with pytest.raises(ValueError, match="key flags"):
        cpu.attention_rows(q, k, v, torch.tensor([8]), causal=False, offset=0, scaling=1.0, stats=True)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # flags narrower than the keys
        cpu.attention_rows(q, k, v, torch.tensor([8]), causal=False, offset=0, scaling=1.0, stats=True,
                           flags=torch.zeros(1, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        cpu.attention_rows(q, k, v, torch.tensor([8, 8]), causal=False, offset=0, scaling=1.0)


def test_kernel_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu, "_loaded", {})
    monkeypatch.setenv(cpu.ENV, "0")
    assert cpu.load() is None


def test_kernel_without_compiler(monkeypatch, tmp_path, caplog):
    """No compiler: None and one warning, nothing left in the cache."""
    monkeypatch.setattr(cpu, "_loaded", {})
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    assert cpu.load() is None
    assert "no C compiler" in caplog.text
    assert not any(tmp_path.rglob("*"))


def test_kernel_failed_build_leaves_nothing(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu, "_loaded", {})
    monkeypatch.setenv("ATTNPIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "FLAGS", cpu.FLAGS + ["-DATTNPIPE_BROKEN", "-include", "/nonexistent.h"])
    assert cpu.load() is None
    assert "unavailable" in caplog.text
    assert not list((tmp_path / "kernels").glob("*"))


WORD_SPECS = [validate_recipe(r, "test") for r in (
    {"name": "head_stats", "level": "word"}, {"name": "topk", "k": 2, "per_head": False, "level": "word"})]


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_path_stores_what_the_torch_path_stores(arch, tokenizer, monkeypatch):
    """reduce_batch with the kernel and without it (lm.cpu_kernel False: the torch ops), every
    recipe, padding in the batch, token and word level: the same rows (indices equal, weights
    within 1e-5). T5's position bias and BART's cross-attention go to the torch ops either way."""
    lm, _ = loaded(arch, tokenizer)
    assert lm.cpu_kernel and lm.provenance["cpu_kernel"] is True
    windows = _padded_windows(tokenizer)
    specs = SPECS + WORD_SPECS
    used = []
    build = reduce_module._layer_attention
    monkeypatch.setattr(reduce_module, "_layer_attention", lambda *a: used.append(build(*a)) or used[-1])
    with_kernel = reduce_batch(lm, windows, specs)
    assert any(isinstance(att, CompiledAttention) for att in used) == (arch != "t5")
    lm.cpu_kernel = False
    without = reduce_batch(lm, windows, specs)
    assert [(o.recipe, o.layer, o.site) for o in with_kernel] == [(o.recipe, o.layer, o.site) for o in without]
    for a, b in zip(with_kernel, without):
        assert a.columns.keys() == b.columns.keys()
        for name, col in a.columns.items():
            if col.dtype.kind == "f":
                np.testing.assert_allclose(col, b.columns[name], atol=1e-5, err_msg=f"{specs[a.recipe]} {name}")
            else:
                np.testing.assert_array_equal(col, b.columns[name], err_msg=f"{specs[a.recipe]} {name}")


def test_kernel_path_gives_the_models_outputs(tokenizer):
    """The layer outputs the kernel computes (P V) are the model's: the last hidden states of a
    padded batch equal those of the eager model on every real token."""
    from attnpipe.windows import collate

    lm, reference = loaded("llama", tokenizer)
    windows = _padded_windows(tokenizer)
    ids, mask = collate(windows, lm.pad_id)
    kept = {}
    original = lm.forward

    def forward(*args, **kwargs):
        kept["out"] = original(*args, **kwargs)
        return kept["out"]

    lm.forward = forward
    reduce_batch(lm, windows, SPECS[:1])
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(kept["out"].last_hidden_state[real], expected[real], atol=1e-5, rtol=1e-5)
