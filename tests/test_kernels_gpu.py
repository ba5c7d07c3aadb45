"""GPU tier for pipeline.kernels: the Triton kernels compiled (never the interpreter) on CUDA, at
model-like shapes with the default tiles, against the torch reference on the same GPU.

Tolerances: float32 products of bf16/fp16 inputs are exact on the tensor cores and the reference
matmul runs in full float32 (TF32 off), so only the summation order differs: 1e-4 relative and
absolute on LSE and statistics (sums over up to 1024 keys), 1e-5 on top-k weights, 1e-2 on the
bf16 head-mean map (one bf16 rounding step).
"""

from __future__ import annotations

import pytest
import torch

from attnpipe.kernels import reference as R

from test_kernels import INTERPRETED, T, assert_topk, poisoned, written  # noqa: F401 (poisoned: fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(T is None or INTERPRETED, reason="needs compiled triton (TRITON_INTERPRET unset)")]

# name: (batch, head, kv_head, pos, dim, dtype, causal, window)
SHAPES = {
    "bert-base": (4, 12, 12, 512, 64, torch.bfloat16, False, None),
    "llama-gqa": (2, 32, 8, 1024, 64, torch.bfloat16, True, None),
    "llama-gqa-window": (2, 32, 8, 1024, 64, torch.bfloat16, True, 200),
    "gqa-d128-fp16": (3, 8, 2, 389, 128, torch.float16, True, None),
    "fp32": (2, 4, 2, 300, 64, torch.float32, False, None),
}


@pytest.fixture(autouse=True)
def full_float32_reference():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", SHAPES)
def test_compiled_kernels_match_reference(name, poisoned):
    batch, heads, kv_heads, n, dim, dtype, causal, window = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(len(name))
    q = (torch.randn(batch, n, heads, dim, device="cuda", generator=gen) * 1.5).to(dtype).transpose(1, 2)
    k = torch.randn(batch, n, kv_heads, dim, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    lengths = torch.tensor([n, 1, n - 77][:batch] + [n // 2 + 1] * max(0, batch - 3), dtype=torch.int32, device="cuda")
    flags = torch.randint(0, 8, (batch, n), device="cuda", generator=gen, dtype=torch.uint8)
    kw = dict(scaling=dim ** -0.5, lengths=lengths, causal=causal, window=window)

    want_lse = R.row_lse(q, k, **kw)
    lse = T.row_lse(q, k, **kw)
    written(lse)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    stats = T.row_stats(q, k, lse, key_flags=flags, **kw)
    written(stats)
    torch.testing.assert_close(stats, R.row_stats(q, k, want_lse, key_flags=flags, **kw), atol=1e-4, rtol=1e-4)
    p = R._probs(q, k, want_lse, kw["scaling"], lengths, causal, window)[0]
    for k_top, head_mean in ((8, False), (8, True), (32, False)):
        got = T.row_topk(q, k, lse, k_top=k_top, head_mean=head_mean, **kw)
        written(*got)
        want = R.row_topk(q, k, want_lse, k_top=k_top, head_mean=head_mean, **kw)
        assert_topk(got, want, (p.mean(1, keepdim=True) if head_mean else p).cpu(), 1e-5)
    mean_map = T.head_mean_map(q, k, lse, **kw)
    written(mean_map)
    torch.testing.assert_close(mean_map.float(), R.head_mean_map(q, k, want_lse, **kw).float(), atol=1e-3, rtol=1e-2)
