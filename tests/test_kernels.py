"""attnpipe.kernels: the torch reference against a naive float64 softmax, then the Triton kernels
against the reference.

Triton decides when it is first imported whether @triton.jit compiles or interprets (its own
tl.max, tl.sort, tl.topk included), and this test session has imported it before this module
(transformers pulls it in through conftest). So on a machine without CUDA the Triton cases run in
a child pytest process started with TRITON_INTERPRET=1, where they run in Triton's interpreter on
CPU tensors; nothing leaks into this session's environment. With CUDA the same cases run compiled,
in process. Shapes are tiny and tiles 16 wide so that several query and key tiles, and partial
ones, are crossed.

Tolerances: reference vs float64, 2e-5 absolute on weights, LSE and entropy (float32 rounding of
O(10) scores); Triton vs reference, 1e-5 (both float32 with exact products of the same inputs,
only the summation order differs), 1e-2 relative on a bf16 map (one bf16 rounding step).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnpipe.kernels import reference as R

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from attnpipe.kernels import triton_attn as T
    INTERPRETED = isinstance(triton.language.standard.sort, InterpretedFunction)
except ImportError:  # the reference tests still run
    T, INTERPRETED = None, False
IN_PROCESS = T is not None and (INTERPRETED or torch.cuda.is_available())
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
triton_here = pytest.mark.skipif(not IN_PROCESS, reason="Triton cases run in the interpreter child process "
                                 "(test_kernels_in_interpreter_process), or triton is not installed")


def test_kernels_in_interpreter_process():
    """Without CUDA: run this file's Triton cases in a child started with TRITON_INTERPRET=1."""
    if T is None:
        pytest.skip("triton is not installed")
    if IN_PROCESS:
        pytest.skip("the Triton cases run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
                            __file__], cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
                           timeout=900)
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    summary = child.stdout.strip().splitlines()[-1]  # e.g. "11 passed, 10 deselected in 60.0s"
    assert "passed" in summary and "skipped" not in summary, report


# ---------------------------------------------------------------------------------------------
# Inputs and the naive float64 computation


def make_inputs(seed, *, kv_heads=2, heads=4, dim=16, n=40, lengths=(40, 13), dtype=torch.float32,
                hf_layout=False, ties=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, dim, generator=gen) * 1.5
    k = torch.randn(2, kv_heads, n, dim, generator=gen)
    if ties:  # duplicate keys (equal weights in different tiles) and a zero query (a uniform row)
        k[:, :, n - 5] = k[:, :, 3]
        q[:, :, 7] = 0.0
    if hf_layout:  # (batch, pos, head, dim) storage seen through a transpose, as HF models hand it over
        q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    flags = torch.randint(0, 8, (2, n), generator=gen, dtype=torch.uint8)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    return q.to(dtype), k.to(dtype), lengths, flags


def naive_valid(lengths, n, causal, window):
    valid = torch.zeros(len(lengths), 1, n, n, dtype=torch.bool)
    for b, length in enumerate(lengths.tolist()):
        for i in range(length):
            for j in range(length):
                valid[b, 0, i, j] = (not causal or j <= i) and (window is None or i - j < window)
    return valid


def naive(q, k, lengths, causal, window, scaling):
    """(P, LSE, valid) in float64 with a plain masked softmax."""
    n_rep = q.shape[1] // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(n_rep, 1)) * scaling
    valid = naive_valid(lengths, q.shape[2], causal, window)
    s = s.masked_fill(~valid, float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)  # padded queries: all -inf -> NaN -> 0
    lse = torch.where(valid.any(-1), s.logsumexp(-1), 0.0)
    return p, lse, valid


def naive_stats(p, flags):
    n = p.shape[-1]
    cols = torch.zeros(*p.shape[:3], 9, dtype=torch.float64)
    cols[..., 0] = -torch.special.xlogy(p, p).sum(-1)
    cols[..., 1] = p[..., 0]
    for col, bit in ((2, R.SEP), (3, R.SPECIAL), (7, R.PUNCT)):
        cols[..., col] = (p * ((flags & bit) != 0)[:, None, None, :]).sum(-1)
    for i in range(n):
        cols[..., i, 4] = p[..., i, i]
        cols[..., i, 5] = p[..., i, i - 1] if i > 0 else 0.0
        cols[..., i, 6] = p[..., i, i + 1] if i + 1 < n else 0.0
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().double()
    cols[..., 8] = (p * distance).sum(-1)
    return cols


def naive_topk(p, valid, k_top):
    """Python sort of each row's valid keys by (weight desc, position asc)."""
    values = torch.full((*p.shape[:3], k_top), -1.0, dtype=torch.float64)
    indices = torch.full((*p.shape[:3], k_top), -1, dtype=torch.long)
    for b, h, i in torch.cartesian_prod(*(torch.arange(s) for s in p.shape[:3])).tolist():
        keys = [j for j in range(p.shape[-1]) if valid[b, 0, i, j]]
        best = sorted(keys, key=lambda j: (-float(p[b, h, i, j]), j))[:k_top]
        values[b, h, i, :len(best)] = p[b, h, i, best]
        indices[b, h, i, :len(best)] = torch.tensor(best, dtype=torch.long)
    return values, indices


# ---------------------------------------------------------------------------------------------
# 1. reference vs naive float64

REFERENCE_CASES = {
    "mha": dict(kv_heads=4, causal=False, window=None),
    "gqa-causal": dict(kv_heads=2, causal=True, window=None),
    "gqa-causal-window": dict(kv_heads=2, causal=True, window=6),
    "window-not-causal": dict(kv_heads=1, causal=False, window=4),
    "one-token-window": dict(kv_heads=2, causal=True, window=1),
    "ties": dict(kv_heads=2, causal=False, window=None, ties=True),
}


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_reference_matches_naive_float64(name):
    case = dict(REFERENCE_CASES[name])
    causal, window = case.pop("causal"), case.pop("window")
    q, k, lengths, flags = make_inputs(list(REFERENCE_CASES).index(name), lengths=(40, 1), **case)
    kw = dict(scaling=16 ** -0.5, lengths=lengths, causal=causal, window=window)
    p, lse, valid = naive(q, k, lengths, causal, window, kw["scaling"])

    got_lse = R.row_lse(q, k, **kw)
    torch.testing.assert_close(got_lse.double(), lse, atol=2e-5, rtol=0)
    stats = R.row_stats(q, k, got_lse, key_flags=flags, **kw)
    torch.testing.assert_close(stats.double(), naive_stats(p, flags), atol=2e-5, rtol=1e-5)
    for head_mean in (False, True):
        rows = p.mean(1, keepdim=True) if head_mean else p
        values, indices = R.row_topk(q, k, got_lse, k_top=9, head_mean=head_mean, **kw)
        want_values, want_indices = naive_topk(rows, valid, 9)
        torch.testing.assert_close(values.double(), want_values, atol=2e-6, rtol=0)
        assert torch.equal(indices.long(), want_indices)  # ties by position: exact
    mean_map = R.head_mean_map(q, k, got_lse, out_dtype=torch.float32, **kw)
    torch.testing.assert_close(mean_map.double(), p.mean(1), atol=2e-6, rtol=0)


def test_reference_padding_and_short_rows():
    q, k, lengths, flags = make_inputs(11, lengths=(3, 1), n=8)
    kw = dict(scaling=0.25, lengths=lengths, causal=True, window=None)
    lse = R.row_lse(q, k, **kw)
    assert (lse[0, :, 3:] == 0).all() and (lse[1, :, 1:] == 0).all()
    assert (R.row_stats(q, k, lse, key_flags=flags, **kw)[1, :, 1:] == 0).all()
    values, indices = R.row_topk(q, k, lse, k_top=4, head_mean=False, **kw)
    assert torch.equal(indices[1, 0, 0], torch.tensor([0, -1, -1, -1], dtype=torch.int32))  # one key only
    assert torch.equal(values[1, 0, 0], torch.tensor([1.0, -1.0, -1.0, -1.0]))
    assert (indices[1, :, 1:] == -1).all() and (values[1, :, 1:] == -1).all()  # padded queries: empty


def test_reference_rejects_bad_inputs():
    q, k, lengths, flags = make_inputs(0)
    with pytest.raises(ValueError, match="window"):
        R.row_lse(q, k, scaling=1.0, lengths=lengths, causal=True, window=0)
    with pytest.raises(ValueError, match="kv_head"):
        R.row_lse(q[:, :3], k, scaling=1.0, lengths=lengths, causal=True)
    with pytest.raises(ValueError, match="key_flags"):
        R.row_stats(q, k, R.row_lse(q, k, scaling=1.0, lengths=lengths, causal=True), scaling=1.0,
                    lengths=lengths, causal=True, key_flags=flags.long())


# ---------------------------------------------------------------------------------------------
# 2. Triton vs reference

POISON_INT = -2  # never a legal index (-1 is an empty slot)


@pytest.fixture
def poisoned(monkeypatch):
    """Every Triton output starts as NaN (floats) or POISON_INT: anything left unwritten shows."""
    def empty(shape, device, dtype):
        fill = float("nan") if dtype.is_floating_point else POISON_INT
        return torch.full(shape, fill, device=device, dtype=dtype)

    monkeypatch.setattr(T, "_empty", empty)


def written(*tensors):
    for t in tensors:
        assert not (t.isnan().any() if t.is_floating_point() else (t == POISON_INT).any()), "unwritten output"


def assert_topk(got, want, p_rows, tol):
    """Values within tol; an index may differ from the reference only for a near-tie."""
    (values, indices), (want_values, want_indices) = [(v.cpu(), i.cpu().long()) for v, i in (got, want)]
    torch.testing.assert_close(values, want_values, atol=tol, rtol=0)
    assert torch.equal(indices == -1, want_indices == -1)
    differ = indices != want_indices
    weight_of_got = p_rows.float().gather(-1, indices.clamp_min(0))
    assert ((weight_of_got - want_values).abs()[differ] <= tol).all(), "top-k index differs beyond a tie"
    picked = torch.where(indices < 0, 10**6 + torch.arange(indices.shape[-1]), indices)  # empties distinct
    assert (picked.sort(-1).values.diff(dim=-1) != 0).all(), "a key listed twice"


# name: (input kwargs, causal, window, k_tops, tiles (BLOCK_M, BLOCK_N))
TRITON_CASES = {
    "mha-bidirectional-one-token-row": (dict(kv_heads=4, dim=16, n=37, lengths=(37, 1)), False, None, (5,), (16, 16)),
    "gqa-causal-fp32-d32": (dict(kv_heads=2, dim=32, n=70, lengths=(70, 45)), True, None, (5,), (32, 16)),
    "gqa-causal-window-bf16": (dict(kv_heads=2, dim=16, n=53, lengths=(17, 53), dtype=torch.bfloat16),
                               True, 18, (3,), (16, 16)),
    "mha-window-not-causal-bf16-d32": (dict(kv_heads=4, dim=32, n=40, lengths=(33, 40), dtype=torch.bfloat16,
                                            hf_layout=True), False, 5, (4,), (16, 32)),
    "gqa-one-token-window-d24": (dict(kv_heads=2, dim=24, n=24, lengths=(24, 7)), True, 1, (4,), (16, 16)),
    "ties-k-larger-than-row": (dict(kv_heads=1, dim=16, n=26, lengths=(26, 11), ties=True), False, None, (1, 16),
                               (16, 16)),
}


@triton_here
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_matches_reference(name, poisoned):
    inputs, causal, window, k_tops, tiles = TRITON_CASES[name]
    q, k, lengths, flags = (t.to(DEVICE) for t in make_inputs(100 + list(TRITON_CASES).index(name), **inputs))
    kw = dict(scaling=q.shape[-1] ** -0.5, lengths=lengths, causal=causal, window=window)
    p_full = R._probs(q, k, R.row_lse(q, k, **kw), kw["scaling"], lengths, causal, window)[0].cpu()
    with T.tiles(*tiles):
        lse = T.row_lse(q, k, **kw)
        written(lse)
        torch.testing.assert_close(lse, R.row_lse(q, k, **kw), atol=1e-5, rtol=1e-5)
        want_lse = R.row_lse(q, k, **kw)

        stats = T.row_stats(q, k, lse, key_flags=flags, **kw)
        written(stats)
        torch.testing.assert_close(stats, R.row_stats(q, k, want_lse, key_flags=flags, **kw), atol=1e-5, rtol=1e-5)

        for k_top in k_tops:
            for head_mean in (False, True):
                got = T.row_topk(q, k, lse, k_top=k_top, head_mean=head_mean, **kw)
                written(*got)
                want = R.row_topk(q, k, want_lse, k_top=k_top, head_mean=head_mean, **kw)
                assert_topk(got, want, p_full.mean(1, keepdim=True) if head_mean else p_full, 1e-5)

        out_dtype = q.dtype  # float32 inputs: an exact map; bf16 inputs: the pipeline's bf16 map
        mean_map = T.head_mean_map(q, k, lse, out_dtype=out_dtype, **kw)
        written(mean_map)
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(mean_map.float(), R.head_mean_map(q, k, want_lse, out_dtype=out_dtype, **kw).float(),
                                   atol=tol * 0.1, rtol=tol)


@triton_here
def test_triton_ties_break_to_the_smaller_position(poisoned):
    """Equal weights (a duplicated key in another tile; a zero query) rank by position, exactly."""
    q, k, lengths, _ = (t.to(DEVICE) for t in make_inputs(7, kv_heads=2, n=40, lengths=(40, 40), ties=True))
    kw = dict(scaling=0.25, lengths=lengths, causal=False, window=None)
    lse = R.row_lse(q, k, **kw)
    with T.tiles(16, 16):
        _, indices = T.row_topk(q, k, lse, k_top=4, head_mean=False, **kw)
    assert (indices[:, :, 7] == torch.arange(4, device=DEVICE, dtype=torch.int32)).all()  # uniform row
    dup = indices == 35  # key 35 duplicates key 3: wherever it is listed, key 3 is listed before it
    slot_of_3 = (indices == 3).int().argmax(-1, keepdim=True).expand_as(indices)
    slots = torch.arange(4, device=DEVICE).expand_as(indices)
    assert (((indices == 3).any(-1, keepdim=True)) & (slot_of_3 < slots))[dup].all()


@triton_here
def test_triton_rejects_k_top_beyond_the_buffer():
    q, k, lengths, _ = make_inputs(0)
    lse = torch.zeros(q.shape[:3])
    with pytest.raises(ValueError, match="k_top"):
        T.row_topk(q, k, lse, scaling=1.0, lengths=lengths, causal=False, k_top=T.MAX_K_TOP + 1, head_mean=False)


@triton_here
def test_triton_available_and_namespaces():
    import attnpipe.kernels as kernels

    assert kernels.available()  # TRITON_INTERPRET=1 in the child, or CUDA present
    for impl in (kernels.reference, kernels.triton):
        assert all(callable(getattr(impl, f)) for f in ("row_lse", "row_stats", "row_topk", "head_mean_map"))


# ---------------------------------------------------------------------------------------------
# 3. The real launch configurations compile for Hopper (sm_90), no GPU needed

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.uint8: "u8"}


def _compile_for_hopper(kernel, grid, *args, num_warps, **kwargs):
    """Stand-in for triton_attn._run: compile the launch it was given for sm_90 (ptxas included)."""
    from triton.backends.compiler import GPUTarget

    bound = dict(zip(kernel.arg_names, args), **kwargs)
    constexprs = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
    signature = {}
    for name in kernel.arg_names:
        value = bound[name]
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})


@pytest.mark.skipif(T is None or INTERPRETED, reason="needs triton in compiling (not interpreter) mode")
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)],
                         ids=["bf16-d64", "bf16-d128", "fp32-d64"])
def test_launch_configurations_compile_for_sm90(dtype, dim, monkeypatch):
    """Catches what the interpreter accepts but the compiler rejects (layouts, tl.topk on int64 tiles,
    branches on runtime scalars), for the default tiles. Nothing runs: no CUDA needed."""
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.setattr(T, "_run", _compile_for_hopper)
    q, k, lengths, flags = make_inputs(0, dim=dim, dtype=dtype)
    kw = dict(scaling=dim ** -0.5, lengths=lengths, causal=True, window=128)
    lse = T.row_lse(q, k, **kw)
    T.row_stats(q, k, lse, key_flags=flags, **kw)
    for k_top, head_mean in ((8, False), (8, True), (32, False)):
        T.row_topk(q, k, lse, k_top=k_top, head_mean=head_mean, **kw)
    T.head_mean_map(q, k, lse, **kw)
