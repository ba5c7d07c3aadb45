"""Attention statistics from q and k as Triton kernels that never write P to memory.

Same four functions, signatures and conventions as `reference.py` (read its docstring first).
Flash attention's backward recompute: pass 1 (`row_lse`) streams key tiles with an online max and
sum and writes one float32 LSE per row; every other pass recomputes S = q k^T one (BLOCK_M x
BLOCK_N) tile at a time, forms P = exp2(S*log2e - LSE*log2e) in registers and reduces it there.
Only `head_mean_map`, whose output *is* a map, writes anything of size key_pos.

Kernels (axis 0 varies fastest, so neighbouring programs read the same K tiles from L2):
- `_lse_kernel`   grid (query tiles, batch*head): the forward's online softmax without PV.
- `_stats_kernel` grid (query tiles, batch*head): per tile, P*(LSE-S) (entropy), P on the three
  key flags, P*|i-j|; the single-key masses (key 0, self, previous, next) only on the <= 3 tiles
  that hold them, behind a branch on the tile position.
- `_topk_kernel`  grid (query tiles, batch*head), or (query tiles, batch) on the head mean, which
  loops over kv heads (one K tile load) and the n_rep query heads sharing it. P and its key
  position are packed into one int64, (float bits << 32) | (2^31-1-key_pos), so one integer
  compare orders by weight with ties to the smaller position. Each tile is cut to its top KP
  (KP = next power of two >= k_top) by `tl.topk` (a bitonic network), merged with the running
  ascending KP-wide buffer by the bitonic half-cleaner max(buffer_asc, tile_desc) and re-sorted by
  `tl.sort`. Data-independent networks: the interpreter and compiled code take the same steps. A
  tile where no row beats its current k-th entry skips the merge. k_top <= 128.
- `_map_kernel`   grid (key tiles, query tiles, batch): one output tile per program, P summed
  over heads in registers; tiles outside the causal/window band are stored as zeros unread.
Key tiles outside the band are never visited: each query tile loops from the window's first key
(rounded down to a tile) to min(length, its last query + 1) if causal, else to length.

Expected cost (not measured: no GPU was available; F = 2 * batch * head * q_pos * k_pos * dim,
halved by causal skipping; bf16 inputs; H100 SXM: ~990 TFLOP/s bf16 MMA, 3.35 TB/s HBM):
                          BERT-base 32x512, 12 heads, d 64   Llama GQA 4x2048, 32 q/8 kv, d 64, causal
  QK^T FLOPs per pass     12.9 G                             34.4 G (68.7 G dense)
  SDPA forward (QK + PV)  25.8 G                             68.7 G
  q + k read from HBM     25.2 + 25.2 MB                     33.6 + 8.4 MB
  written: row_lse        0.8 MB                             1.0 MB
           row_stats      7.1 MB                             9.4 MB
           row_topk k=8   12.6 MB per head, 1.0 MB mean      16.8 MB per head, 0.5 MB mean
           head_mean_map  16.8 MB bf16 (P in f32: 403 MB)    33.6 MB bf16 (P in f32: 2.1 GB)
  exp2 per pass           101 M                              268 M
Each pass reads q and k once (K tiles are re-read from L2 by the query tiles of a head) and
writes O(rows) bytes: ~250 (BERT) to ~800 (Llama) FLOP per HBM byte against the H100's ~300
ridge, so no pass is bandwidth-bound. The limit is the vector work per score, as in a forward's softmax: ~8 ops + one
exp2 for LSE, ~20 + one exp2 for stats, ~20 for the top-k network. row_lse + row_stats = 2x the
QK^T FLOPs of a forward, no PV GEMM, no P in HBM: about 1-1.5x an SDPA attention forward. The
head-mean passes recompute every head per tile (F FLOPs); their grid is batch x query tiles (128
programs at 4x2048), so a split over key ranges is the next step if they measure slow. Pass 1
disappears where the forward's own kernel returns its LSE.

Accumulation is float32 throughout. float32 inputs use input_precision="ieee" (exact products on
the FMA units: slow, small tiles); bf16/fp16 use the tensor cores (products exact in float32).
The interpreter casts bf16 operands to float32 before tl.dot because it multiplies raw bf16 bit
patterns otherwise (triton-lang/triton#11584); only the summation order differs from compiled.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .reference import EMPTY_INDEX, EMPTY_VALUE, STATS, check_inputs

LOG2E = math.log2(math.e)
_LOG2E, _LN2 = tl.constexpr(LOG2E), tl.constexpr(math.log(2.0))
NEG = tl.constexpr(-1.0e30)  # masked log2 P: finite, so exp2 gives 0 and 0 * NEG stays 0 (no NaN)
_EMPTY_VALUE, _EMPTY_INDEX = tl.constexpr(EMPTY_VALUE), tl.constexpr(EMPTY_INDEX)
MAX_K_TOP = 128
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_tile_override: tuple[int, int] | None = None


@contextlib.contextmanager
def tiles(block_m: int, block_n: int):
    """Force BLOCK_M x BLOCK_N for every kernel (tests cross several small tiles in the interpreter)."""
    global _tile_override
    saved, _tile_override = _tile_override, (block_m, block_n)
    try:
        yield
    finally:
        _tile_override = saved


def _tile(kind: str, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Half types: wgmma tiles for sm_90; float32: the exact (ieee)
    product runs on the FMA units and holds its operands in registers, so its tiles are small.
    ptxas (sm_90, head_dim 64 to 128) reports no spills for these, except <= 200 bytes of stack
    for k_top > 64 and for the head-mean top-k with k_top 32 at head_dim 128."""
    if _tile_override is not None:
        return (*_tile_override, 4)
    if dtype == torch.float32:
        return 32, 32, 8 if kind == "mean" else 4
    return {"lse": (128, 64, 8), "stats": (128, 64, 8), "topk": (64, 64, 8), "mean": (64, 64, 8)}[kind]


@triton.jit
def _valid(qpos, kpos, length, n_query, n_keys, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Broadcastable bool: query qpos may attend to key kpos."""
    ok = (qpos < tl.minimum(length, n_query)) & (kpos < tl.minimum(length, n_keys))
    if CAUSAL:
        ok = ok & (kpos <= qpos)
    if HAS_WINDOW:
        ok = ok & (qpos - kpos < window)
    return ok


@triton.jit
def _band(m0, length, n_keys, window, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi): the keys any query in [m0, m0 + BLOCK_M) may see; empty for an all-padding tile."""
    hi = tl.minimum(length, n_keys)
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
    hi = hi * (m0 < length).to(tl.int32)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 - window + 1, 0)
    return lo, hi


@triton.jit
def _load_rows(ptr, rows, offs_d, n_rows, head_dim, row_stride):
    """(len(rows), BLOCK_D) tile of a (pos, dim) matrix with unit dim stride; zeros outside."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
    return tl.load(ptr + rows[:, None] * row_stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_kt(k_ptr, offs_n, offs_d, n_keys, head_dim, skn):
    """(BLOCK_D, BLOCK_N) transposed key tile; zeros outside."""
    mask = (offs_n[None, :] < n_keys) & (offs_d[:, None] < head_dim)
    return tl.load(k_ptr + offs_n[None, :] * skn + offs_d[:, None], mask=mask, other=0.0)


@triton.jit
def _log2_probs(q, kt, lse2, valid, scale2, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """log2 P = S*log2e - LSE*log2e of a (BLOCK_M, BLOCK_N) tile, NEG outside valid pairs."""
    if UPCAST:
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=PRECISION)
    else:
        s = tl.dot(q, kt, input_precision=PRECISION)
    return tl.where(valid, s * scale2 - lse2[:, None], NEG)


@triton.jit
def _lse_kernel(Q, K, L, LSE, sqb, sqh, sqm, skb, skh, skn, n_heads, n_rep, n_query, n_keys, head_dim,
                window, scale2, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    length = tl.load(L + b)
    offs_m, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, n_query, head_dim, sqm)
    k_ptr = K + b * skb + (h // n_rep) * skh
    row_max = tl.full((BLOCK_M,), NEG, tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    lo, hi = _band(m0, length, n_keys, window, BLOCK_M, CAUSAL, HAS_WINDOW)
    for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = _valid(offs_m[:, None], offs_n[None, :], length, n_query, n_keys, window, CAUSAL, HAS_WINDOW)
        s2 = _log2_probs(q, _load_kt(k_ptr, offs_n, offs_d, n_keys, head_dim, skn), zero, valid, scale2, UPCAST,
                         PRECISION)
        new_max = tl.maximum(row_max, tl.max(s2, 1))
        # A row with no valid key yet sums exp2(0) = 1 per NEG entry; its first real key sets
        # new_max far above NEG and the factor exp2(NEG - real) = 0 erases that.
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s2 - new_max[:, None]), 1)
        row_max = new_max
    # The row maximum contributes exactly 1, so a real row sums to >= 1; the clamp only keeps empty
    # (padding) rows away from log2(0).
    lse = (row_max + tl.log2(tl.maximum(row_sum, 1.0))) * _LN2  # log2 -> nats
    row_ok = offs_m < tl.minimum(length, n_query)
    tl.store(LSE + bh * n_query + offs_m, tl.where(row_ok, lse, 0.0), mask=offs_m < n_query)


@triton.jit
def _stats_kernel(Q, K, L, LSE, FLAGS, OUT, sqb, sqh, sqm, skb, skh, skn, sfb, n_heads, n_rep, n_query,
                  n_keys, head_dim, window, scale2, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    length = tl.load(L + b)
    offs_m, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, n_query, head_dim, sqm)
    k_ptr = K + b * skb + (h // n_rep) * skh
    lse2 = tl.load(LSE + bh * n_query + offs_m, mask=offs_m < n_query, other=0.0) * _LOG2E
    entropy = tl.zeros((BLOCK_M,), tl.float32)  # sum P * (LSE - S), in log2 units until the end
    sep = tl.zeros((BLOCK_M,), tl.float32)
    special = tl.zeros((BLOCK_M,), tl.float32)
    punct = tl.zeros((BLOCK_M,), tl.float32)
    distance = tl.zeros((BLOCK_M,), tl.float32)
    first = tl.zeros((BLOCK_M,), tl.float32)
    self_ = tl.zeros((BLOCK_M,), tl.float32)
    prev = tl.zeros((BLOCK_M,), tl.float32)
    next_ = tl.zeros((BLOCK_M,), tl.float32)
    lo, hi = _band(m0, length, n_keys, window, BLOCK_M, CAUSAL, HAS_WINDOW)
    for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = _valid(offs_m[:, None], offs_n[None, :], length, n_query, n_keys, window, CAUSAL, HAS_WINDOW)
        x = _log2_probs(q, _load_kt(k_ptr, offs_n, offs_d, n_keys, head_dim, skn), lse2, valid, scale2, UPCAST,
                        PRECISION)
        p = tl.exp2(x)  # (BLOCK_M, BLOCK_N), 0 outside valid pairs
        entropy -= tl.sum(p * x, 1)
        flags = tl.load(FLAGS + b * sfb + offs_n, mask=offs_n < n_keys, other=0)
        special += tl.sum(tl.where((flags & 1)[None, :] != 0, p, 0.0), 1)
        sep += tl.sum(tl.where((flags & 2)[None, :] != 0, p, 0.0), 1)
        punct += tl.sum(tl.where((flags & 4)[None, :] != 0, p, 0.0), 1)
        offset = offs_n[None, :] - offs_m[:, None]  # key_pos - query_pos
        distance += tl.sum(p * tl.abs(offset).to(tl.float32), 1)
        # Single keys (0, self, previous, next) live in at most three tiles: reduce only there.
        if n0 == 0:
            first += tl.sum(tl.where(offs_n[None, :] == 0, p, 0.0), 1)
        if (n0 <= m0 + BLOCK_M) & (n0 + BLOCK_N >= m0):
            self_ += tl.sum(tl.where(offset == 0, p, 0.0), 1)
            prev += tl.sum(tl.where(offset == -1, p, 0.0), 1)
            next_ += tl.sum(tl.where(offset == 1, p, 0.0), 1)
    out, row = OUT + (bh * n_query + offs_m) * 9, offs_m < n_query  # columns in reference.STATS order
    tl.store(out + 0, tl.maximum(entropy * _LN2, 0.0), mask=row)
    tl.store(out + 1, first, mask=row)
    tl.store(out + 2, sep, mask=row)
    tl.store(out + 3, special, mask=row)
    tl.store(out + 4, self_, mask=row)
    tl.store(out + 5, prev, mask=row)
    tl.store(out + 6, next_, mask=row)
    tl.store(out + 7, punct, mask=row)
    tl.store(out + 8, distance, mask=row)


@triton.jit
def _head_mean_probs(Q, K, LSE, b, offs_m, offs_n, offs_d, valid, sqb, sqh, sqm, skb, skh, skn, n_heads, n_rep,
                     n_query, n_keys, head_dim, scale2, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mean over heads of P on one tile: each K tile is loaded once for the n_rep heads sharing it."""
    total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(0, n_heads // n_rep):
        kt = _load_kt(K + b * skb + g * skh, offs_n, offs_d, n_keys, head_dim, skn)
        for r in range(0, n_rep):
            h = g * n_rep + r
            q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, n_query, head_dim, sqm)
            lse = tl.load(LSE + (b * n_heads + h) * n_query + offs_m, mask=offs_m < n_query, other=0.0)
            total += tl.exp2(_log2_probs(q, kt, lse * _LOG2E, valid, scale2, UPCAST, PRECISION))
    return total / n_heads


@triton.jit
def _topk_kernel(Q, K, L, LSE, VALUES, INDICES, sqb, sqh, sqm, skb, skh, skn, n_heads, n_rep, n_query, n_keys,
                 head_dim, window, scale2, k_top, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_MEAN: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    row_set = tl.program_id(1).to(tl.int64)  # batch * n_heads + head, or batch on the head mean
    if HEAD_MEAN:
        b = row_set
    else:
        b, h = row_set // n_heads, row_set % n_heads
    length = tl.load(L + b)
    offs_m, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    if not HEAD_MEAN:
        q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, n_query, head_dim, sqm)
        lse2 = tl.load(LSE + row_set * n_query + offs_m, mask=offs_m < n_query, other=0.0) * _LOG2E
        k_ptr = K + b * skb + (h // n_rep) * skh
    best = tl.full((BLOCK_M, KP), -1, tl.int64)  # packed keys, ascending; -1 = empty slot
    lo, hi = _band(m0, length, n_keys, window, BLOCK_M, CAUSAL, HAS_WINDOW)
    for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = _valid(offs_m[:, None], offs_n[None, :], length, n_query, n_keys, window, CAUSAL, HAS_WINDOW)
        if HEAD_MEAN:
            p = _head_mean_probs(Q, K, LSE, b, offs_m, offs_n, offs_d, valid, sqb, sqh, sqm, skb, skh, skn,
                                 n_heads, n_rep, n_query, n_keys, head_dim, scale2, UPCAST, PRECISION,
                                 BLOCK_M, BLOCK_N)
        else:
            kt = _load_kt(k_ptr, offs_n, offs_d, n_keys, head_dim, skn)
            p = tl.exp2(_log2_probs(q, kt, lse2, valid, scale2, UPCAST, PRECISION))
        packed = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - offs_n).to(tl.int64)[None, :]
        packed = tl.where(valid, packed, -1)
        # Merge only when some row's tile maximum beats that row's current k-th best.
        if tl.max((tl.max(packed, 1) > tl.min(best, 1)).to(tl.int32), 0) > 0:
            # best ascending, tile top descending: their elementwise max is the top KP of both.
            best = tl.sort(tl.maximum(best, tl.topk(packed, KP)))
    best = tl.sort(best, descending=True)
    empty = best < 0
    values = tl.where(empty, _EMPTY_VALUE, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True))
    indices = tl.where(empty, _EMPTY_INDEX, 2147483647 - best.to(tl.int32))
    offs_k = tl.arange(0, KP)
    out = (row_set * n_query + offs_m[:, None]) * k_top + offs_k[None, :]
    mask = (offs_m[:, None] < n_query) & (offs_k[None, :] < k_top)
    tl.store(VALUES + out, values, mask=mask)
    tl.store(INDICES + out, indices, mask=mask)


@triton.jit
def _map_kernel(Q, K, L, LSE, OUT, sqb, sqh, sqm, skb, skh, skn, sob, som, n_heads, n_rep, n_query, n_keys,
                head_dim, window, scale2, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n0, m0 = tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_M
    b = tl.program_id(2).to(tl.int64)
    length = tl.load(L + b)
    offs_m, offs_n, offs_d = m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    mean = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    lo, hi = _band(m0, length, n_keys, window, BLOCK_M, CAUSAL, HAS_WINDOW)
    if (n0 < hi) & (n0 + BLOCK_N > lo):  # else the whole tile is outside the band: zeros
        valid = _valid(offs_m[:, None], offs_n[None, :], length, n_query, n_keys, window, CAUSAL, HAS_WINDOW)
        mean = _head_mean_probs(Q, K, LSE, b, offs_m, offs_n, offs_d, valid, sqb, sqh, sqm, skb, skh, skn,
                                n_heads, n_rep, n_query, n_keys, head_dim, scale2, UPCAST, PRECISION,
                                BLOCK_M, BLOCK_N)
    out = OUT + b * sob + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :]
    tl.store(out, mean.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < n_query) & (offs_n[None, :] < n_keys))


def _empty(shape, device, dtype) -> torch.Tensor:
    """Every output is allocated here (the tests poison it to prove each element gets written)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _run(kernel, grid, *args, **kwargs) -> None:
    """Every launch goes through here (the tests compile instead of launching, for sm_90)."""
    kernel[grid](*args, **kwargs)


def _launch(q, k, lengths, scaling, causal, window, kind, key_flags=None, lse=None):
    """(q, k, lengths, lse, kernel keyword arguments) shared by every kernel; validates like the
    reference and brings the small tensors to q's device, dtype and layout."""
    n_rep = check_inputs(q, k, lengths, window, key_flags, lse)
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q and k must share one of float32, bfloat16, float16; got {q.dtype} and {k.dtype}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    block_m, block_n, warps = _tile(kind, q.dtype)
    args = dict(sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2), skb=k.stride(0), skh=k.stride(1),
                skn=k.stride(2), n_heads=q.shape[1], n_rep=n_rep, n_query=q.shape[2], n_keys=k.shape[2],
                head_dim=q.shape[3], window=window or 0, scale2=float(scaling) * LOG2E, CAUSAL=bool(causal),
                HAS_WINDOW=window is not None, UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), num_warps=warps)
    if lse is not None:
        lse = lse.to(q.device, torch.float32).contiguous()
    return q, k, lengths.to(device=q.device, dtype=torch.int32), lse, args


def row_lse(q, k, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """As reference.row_lse: (batch, head, query_pos) float32 log-sum-exp over valid keys."""
    q, k, lengths, _, args = _launch(q, k, lengths, scaling, causal, window, "lse")
    lse = _empty(q.shape[:3], q.device, torch.float32)
    if lse.numel():
        grid = (triton.cdiv(q.shape[2], args["BLOCK_M"]), q.shape[0] * q.shape[1])
        _run(_lse_kernel, grid, q, k, lengths, lse, **args)
    return lse


def row_stats(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
              key_flags: torch.Tensor) -> torch.Tensor:
    """As reference.row_stats: (batch, head, query_pos, 9) float32, columns in reference.STATS order."""
    q, k, lengths, lse, args = _launch(q, k, lengths, scaling, causal, window, "stats", key_flags, lse)
    flags = key_flags.to(q.device).contiguous()
    out = _empty((*q.shape[:3], len(STATS)), q.device, torch.float32)
    if out.numel():
        grid = (triton.cdiv(q.shape[2], args["BLOCK_M"]), q.shape[0] * q.shape[1])
        _run(_stats_kernel, grid, q, k, lengths, lse, flags, out, sfb=flags.stride(0), **args)
    return out


def row_topk(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
             k_top: int, head_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """As reference.row_topk (empty slots: value -1.0, index -1); k_top at most MAX_K_TOP."""
    if not 1 <= k_top <= MAX_K_TOP:
        raise ValueError(f"k_top must be in 1..{MAX_K_TOP} for the Triton path; got {k_top}")
    q, k, lengths, lse, args = _launch(q, k, lengths, scaling, causal, window, "mean" if head_mean else "topk",
                                       lse=lse)
    kp = triton.next_power_of_2(k_top)
    args["BLOCK_N"] = max(args["BLOCK_N"], kp)  # tl.topk cuts a tile to kp columns
    shape = (q.shape[0], 1 if head_mean else q.shape[1], q.shape[2], k_top)
    values, indices = _empty(shape, q.device, torch.float32), _empty(shape, q.device, torch.int32)
    if values.numel():
        grid = (triton.cdiv(q.shape[2], args["BLOCK_M"]), shape[0] * shape[1])
        _run(_topk_kernel, grid, q, k, lengths, lse, values, indices, k_top=k_top, HEAD_MEAN=bool(head_mean),
             KP=kp, **args)
    return values, indices


def head_mean_map(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """As reference.head_mean_map: (batch, query_pos, key_pos) in out_dtype, zeros outside valid pairs."""
    q, k, lengths, lse, args = _launch(q, k, lengths, scaling, causal, window, "mean", lse=lse)
    out = _empty((q.shape[0], q.shape[2], k.shape[2]), q.device, out_dtype)
    if out.numel():
        grid = (triton.cdiv(k.shape[2], args["BLOCK_N"]), triton.cdiv(q.shape[2], args["BLOCK_M"]), q.shape[0])
        _run(_map_kernel, grid, q, k, lengths, lse, out, sob=out.stride(0), som=out.stride(1), **args)
    return out
