"""Attention statistics from q and k as Triton kernels that never write P to memory.

Same four functions, signatures and conventions as `reference.py` (read its docstring first).
The design is flash attention's backward recompute: pass 1 (`row_lse`) streams key tiles with an
online max and sum and writes one float32 LSE per row; every other pass recomputes S = q k^T one
(BLOCK_M x BLOCK_N) tile at a time, forms P = exp2(S*log2e - LSE*log2e) in registers and reduces
it on the spot. Only `head_mean_map`, whose output *is* a map, writes anything of size key_pos.

Kernels (programs along axis 0 are the fastest-varying, so neighbouring programs share K in L2):
- `_lse_kernel`   grid (query tiles, batch*head). Online softmax statistics, as the forward.
- `_stats_kernel` grid (query tiles, batch*head). Per tile: entropy term P*(LSE-S), P on flagged
  keys, P*|i-j|. The single-key masses (key 0, self, previous, next) are not tile reductions: each
  is one row-wise dot q_i . k_j outside the loop, which saves four masked sums per element.
- `_topk_kernel`  grid (query tiles, batch*head), or (query tiles, batch) on the head mean, whose
  inner loop runs over kv heads (one K tile load) and the n_rep query heads that share it.
  Running top-k: P and its key position are packed into one int64 (float bits << 32 |
  2^31-1-key_pos), which orders by weight and breaks ties to the smaller position with a single
  integer compare. A tile is first cut to its top KP (KP = next power of two >= k_top) with
  `tl.topk` (bitonic), then merged with the ascending KP-wide buffer by the bitonic half-cleaner
  max(buffer_asc, tile_desc) and re-sorted with `tl.sort`. Both are data-independent networks,
  so the interpreter and compiled code run the same steps; a tile that cannot beat any row's
  current k-th entry skips the merge (one max per row). k_top <= 128 (BLOCK_N is raised to KP).
- `_map_kernel`   grid (key tiles, query tiles, batch): one output tile per program, summing P
  over heads in registers; tiles outside the causal/window band are written as zeros, unread.
Key tiles outside the band are never visited: the loop runs from the window's first key (rounded
down to the tile) to min(length, last query of the tile + 1) when causal, else to length.

Cost (dense QK^T FLOPs F = 2 * batch * head * query_pos * key_pos * dim, halved when causal; bf16
q/k; an H100 SXM has ~990 TFLOP/s bf16 tensor, ~67 TFLOP/s fp32 vector, 3.35 TB/s HBM):
                         BERT-base 32x512 (12 heads, d 64)  Llama GQA 4x2048 (32 q / 8 kv, d 64, causal)
  QK^T per pass          F = 12.9 GFLOP                     F = 34.4 GFLOP (dense 68.7)
  SDPA forward (QK,PV)   25.8 GFLOP                         68.7 GFLOP
  q + k read (HBM)       25.2 + 25.2 MB                     33.6 + 8.4 MB
  row_lse writes         0.8 MB                             1.0 MB
  row_stats writes       7.1 MB (9 x float32 per row)       9.4 MB
  row_topk k=8 writes    12.6 MB per head, 0.5 MB mean      16.8 MB per head, 0.5 MB mean
  head_mean_map writes   16.8 MB bf16 (vs 403 MB for P)     33.6 MB bf16 (vs 2.1 GB for P f32)
  exp2 per pass          101 M                              268 M (causal half of 537 M)
Every pass reads q and k once from HBM (tiles of K are re-read by the query tiles of the same
head from L2) and writes O(rows) bytes, so each pass is compute-bound: arithmetic intensity is
~250 FLOP/byte against the H100's ~300 ridge, and the elementwise work per score (about 8 ops
for LSE, ~20 for stats, the top-k network for topk) runs on the vector units like the softmax of
a forward. pass 1 + one recompute pass = 2x the QK^T FLOPs and about 2x the exp count of a
forward with no PV GEMM and no P in HBM, so row_lse + row_stats should land near 1-1.5x of an SDPA
attention forward (not measured: this module has only run in the interpreter). `head_mean_map`
and the head-mean top-k recompute every head per output tile: F FLOPs, plus the output.
Pass 1 could be dropped entirely where the forward's own kernel returns the LSE.

Accumulation is float32 throughout. float32 inputs use input_precision="ieee" (exact products,
vector FMA: slow but matches the reference to ~1e-6); bf16/fp16 use tensor cores. Under the
interpreter bf16 operands are cast to float32 before tl.dot: Triton's interpreter multiplies the
raw bf16 bit patterns (triton-lang/triton#11584, unsupported upstream); the products are exact in
float32 either way, so only the summation order differs from the compiled path.
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
LN2 = math.log(2.0)
NEG = tl.constexpr(-1.0e30)  # masked log2 P: finite, so exp2 gives 0 and 0 * NEG stays 0 (no NaN)
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
    Each choice compiles for sm_90 with no register spills at head_dim 64 and 128 (ptxas)."""
    if _tile_override is not None:
        return (*_tile_override, 4)
    if dtype == torch.float32:
        return 32, 32, 4
    return {"lse": (128, 64, 8), "stats": (128, 64, 8), "topk": (64, 64, 8), "mean": (64, 64, 8)}[kind]


@triton.jit
def _valid(qpos, kpos, length, n_query, n_keys, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Broadcastable bool: query qpos may attend to key kpos."""
    ok = (qpos < tl.minimum(length, n_query)) & (kpos >= 0) & (kpos < tl.minimum(length, n_keys))
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
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (offs_d[None, :] < head_dim)
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
    lse = (row_max + tl.log2(tl.maximum(row_sum, 1.0))) * 0.6931471805599453  # log2 -> nats
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
    lse2 = tl.load(LSE + bh * n_query + offs_m, mask=offs_m < n_query, other=0.0) * 1.4426950408889634
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
    tl.store(out + 0, tl.maximum(entropy * 0.6931471805599453, 0.0), mask=row)
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
            total += tl.exp2(_log2_probs(q, kt, lse * 1.4426950408889634, valid, scale2, UPCAST, PRECISION))
    return total / n_heads


@triton.jit
def _topk_kernel(Q, K, L, LSE, VALUES, INDICES, sqb, sqh, sqm, skb, skh, skn, n_heads, n_rep, n_query, n_keys,
                 head_dim, window, scale2, k_top, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_MEAN: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    row_set = tl.program_id(1).to(tl.int64)  # batch*head + head, or batch on the head mean
    if HEAD_MEAN:
        b = row_set
    else:
        b, h = row_set // n_heads, row_set % n_heads
    length = tl.load(L + b)
    offs_m, offs_d = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    if not HEAD_MEAN:
        q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, n_query, head_dim, sqm)
        lse2 = tl.load(LSE + row_set * n_query + offs_m, mask=offs_m < n_query, other=0.0) * 1.4426950408889634
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
    values = tl.where(empty, -1.0, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True))  # EMPTY_VALUE
    indices = tl.where(empty, -1, 2147483647 - best.to(tl.int32))  # EMPTY_INDEX
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


def _launch(q, k, lengths, scaling, causal, window, kind, key_flags=None):
    """(q, k, lengths, kernel keyword arguments) shared by every kernel; validates like the reference."""
    n_rep = check_inputs(q, k, lengths, window, key_flags)
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
    return q, k, lengths.to(device=q.device, dtype=torch.int32), args


def row_lse(q, k, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """As reference.row_lse: (batch, head, query_pos) float32 log-sum-exp over valid keys."""
    q, k, lengths, args = _launch(q, k, lengths, scaling, causal, window, "lse")
    lse = _empty(q.shape[:3], q.device, torch.float32)
    if lse.numel():
        grid = (triton.cdiv(q.shape[2], args["BLOCK_M"]), q.shape[0] * q.shape[1])
        _run(_lse_kernel, grid, q, k, lengths, lse, **args)
    return lse


def row_stats(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
              key_flags: torch.Tensor) -> torch.Tensor:
    """As reference.row_stats: (batch, head, query_pos, 9) float32, columns in reference.STATS order."""
    q, k, lengths, args = _launch(q, k, lengths, scaling, causal, window, "stats", key_flags)
    out = _empty((*q.shape[:3], len(STATS)), q.device, torch.float32)
    if out.numel():
        grid = (triton.cdiv(q.shape[2], args["BLOCK_M"]), q.shape[0] * q.shape[1])
        _run(_stats_kernel, grid, q, k, lengths, lse.contiguous(), key_flags.contiguous(), out, sfb=key_flags.shape[1],
             **args)
    return out


def row_topk(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
             k_top: int, head_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """As reference.row_topk (empty slots: value -1.0, index -1); k_top at most MAX_K_TOP."""
    if not 1 <= k_top <= MAX_K_TOP:
        raise ValueError(f"k_top must be in 1..{MAX_K_TOP} for the Triton path; got {k_top}")
    q, k, lengths, args = _launch(q, k, lengths, scaling, causal, window, "mean" if head_mean else "topk")
    kp = triton.next_power_of_2(k_top)
    args["BLOCK_N"] = max(args["BLOCK_N"], kp)  # tl.topk cuts a tile to kp columns
    row_sets = q.shape[0] if head_mean else q.shape[0] * q.shape[1]
    shape = (q.shape[0], 1 if head_mean else q.shape[1], q.shape[2], k_top)
    values = _empty(shape, q.device, torch.float32)
    indices = _empty(shape, q.device, torch.int32)
    if values.numel():
        grid = (triton.cdiv(q.shape[2], args["BLOCK_M"]), row_sets)
        _run(_topk_kernel, grid, q, k, lengths, lse.contiguous(), values, indices, k_top=k_top,
             HEAD_MEAN=bool(head_mean), KP=kp, **args)
    return values, indices


def head_mean_map(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """As reference.head_mean_map: (batch, query_pos, key_pos) in out_dtype, zeros outside valid pairs."""
    q, k, lengths, args = _launch(q, k, lengths, scaling, causal, window, "mean")
    out = _empty((q.shape[0], q.shape[2], k.shape[2]), q.device, out_dtype)
    if out.numel():
        grid = (triton.cdiv(k.shape[2], args["BLOCK_N"]), triton.cdiv(q.shape[2], args["BLOCK_M"]), q.shape[0])
        _run(_map_kernel, grid, q, k, lengths, lse.contiguous(), out, sob=out.stride(0), som=out.stride(1), **args)
    return out
