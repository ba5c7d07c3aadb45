"""Attention statistics from a layer's query and key, in plain torch (float32, any device).

The CPU path of the pipeline and the reference the Triton kernels (`triton_attn.py`) are tested
against. Each call builds one score matrix S = (q . k) * scaling of shape (batch, head, query_pos,
key_pos) and reduces it with whole-tensor ops: no Python loop over positions or heads.

Shared conventions (the Triton functions follow them exactly):
- q (batch, head, query_pos, dim), k (batch, kv_head, key_pos, dim), already rotated; query head
  h reads kv head h // n_rep with n_rep = head // kv_head (grouped-query attention).
- lengths (batch,) int: real tokens per row, right padding after them, applied to queries and
  keys alike. A pair (query i, key j) is valid when i < length, j < length, j <= i if causal, and
  i - j < window if a window is given (only that lower bound when not causal, as specified).
- P = softmax of S over the valid keys of a row, in float32 whatever the input dtype; padded
  queries have no valid key and produce zeros (LSE 0, stats 0, empty top-k slots).
"""

from __future__ import annotations

import torch

# row_stats' last dimension, in order.
STATS = ("entropy", "first_mass", "sep_mass", "special_mass", "self_mass", "prev_mass",
         "next_mass", "punct_mass", "mean_distance")
# Bits of key_flags (batch, key_pos) uint8.
SPECIAL, SEP, PUNCT = 1, 2, 4
# A top-k slot with no key: the row has fewer valid keys than k_top, or the query is padding.
EMPTY_VALUE, EMPTY_INDEX = -1.0, -1
_LOW31 = 2**31 - 1


def check_inputs(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, window: int | None,
                 key_flags: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> int:
    """Validate shapes (never values: that would sync the GPU); return n_rep = head // kv_head."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-d (batch, head, pos, dim); got {tuple(q.shape)} and {tuple(k.shape)}")
    (batch, heads, _, dim), (kv_batch, kv_heads, n_keys, kv_dim) = q.shape, k.shape
    if batch != kv_batch or dim != kv_dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or dim, "
                         "or head is not a multiple of kv_head")
    if tuple(lengths.shape) != (batch,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be an integer tensor of shape ({batch},); got {tuple(lengths.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1; got {window!r}")
    if key_flags is not None and (tuple(key_flags.shape) != (batch, n_keys) or key_flags.dtype != torch.uint8):
        raise ValueError(f"key_flags must be uint8 of shape ({batch}, {n_keys}); got "
                         f"{key_flags.dtype} {tuple(key_flags.shape)}")
    if lse is not None and tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape {tuple(q.shape[:3])} (batch, head, query_pos); got {tuple(lse.shape)}")
    return heads // kv_heads


def pair_valid(lengths: torch.Tensor, n_query: int, n_keys: int, causal: bool,
               window: int | None) -> torch.Tensor:
    """(batch, 1, query_pos, key_pos) bool: which (query, key) pairs carry weight."""
    query = torch.arange(n_query, device=lengths.device)[:, None]  # (query_pos, 1)
    key = torch.arange(n_keys, device=lengths.device)[None, :]  # (1, key_pos)
    length = lengths.long()[:, None, None]  # (batch, 1, 1)
    valid = (query < length) & (key < length)  # (batch, query_pos, key_pos)
    if causal:
        valid = valid & (key <= query)
    if window is not None:
        valid = valid & (query - key < window)
    return valid[:, None]


def scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """S = (q . k) * scaling in float32, (batch, head, query_pos, key_pos), without repeating k."""
    batch, heads, n_query, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    # Heads kv*n_rep .. kv*n_rep + n_rep - 1 share kv head kv: stack their queries on one axis.
    grouped = q.float().reshape(batch, kv_heads, (heads // kv_heads) * n_query, dim)
    s = grouped @ k.float().transpose(-1, -2)  # (batch, kv_head, n_rep * query_pos, key_pos)
    return s.view(batch, heads, n_query, n_keys) * scaling


def _probs(q, k, lse, scaling, lengths, causal, window) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, S, valid): P zero outside valid pairs, S the scaled scores (0 outside valid pairs)."""
    check_inputs(q, k, lengths, window, lse=lse)
    valid = pair_valid(lengths.to(q.device), q.shape[2], k.shape[2], causal, window)
    s = scores(q, k, scaling).masked_fill_(~valid, 0.0)
    p = (s - lse[..., None]).exp_().masked_fill_(~valid, 0.0)  # (batch, head, query_pos, key_pos)
    return p, s, valid


def row_lse(q, k, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """(batch, head, query_pos) float32: log-sum-exp of each row of S over its valid keys (0 for padding)."""
    check_inputs(q, k, lengths, window)
    valid = pair_valid(lengths.to(q.device), q.shape[2], k.shape[2], causal, window)
    lse = scores(q, k, scaling).masked_fill_(~valid, float("-inf")).logsumexp(-1)
    return torch.where(valid.any(-1), lse, 0.0)


def _at_offset(p: torch.Tensor, offset: int) -> torch.Tensor:
    """p[..., i, i + offset] as (batch, head, query_pos); 0 where i + offset is not a key position."""
    n_query, n_keys = p.shape[-2:]
    key = torch.arange(n_query, device=p.device) + offset
    inside = (key >= 0) & (key < n_keys)
    index = key.clamp(0, n_keys - 1).view(1, 1, n_query, 1).expand(*p.shape[:2], n_query, 1)
    return p.gather(-1, index).squeeze(-1) * inside


def row_stats(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
              key_flags: torch.Tensor) -> torch.Tensor:
    """(batch, head, query_pos, 9) float32, the per-query statistics named in STATS.

    entropy (nats) is sum_j P_j (LSE - S_j), i.e. LSE - sum P*S arranged so every term is >= 0
    (no log of P); the masses are sums of P over key 0, the flagged keys, the query itself, the
    token before and after; mean_distance is sum_j P_j |query_pos - j|. Padded queries: zeros.
    """
    check_inputs(q, k, lengths, window, key_flags)
    p, s, valid = _probs(q, k, lse, scaling, lengths, causal, window)
    entropy = (p * (lse[..., None] - s)).sum(-1).clamp_min_(0.0)
    bits = torch.tensor([SEP, SPECIAL, PUNCT], dtype=torch.uint8, device=p.device)
    flags = ((key_flags.to(p.device)[..., None] & bits) != 0).float()  # (batch, key_pos, 3)
    flag_mass = p @ flags[:, None]  # (batch, head, query_pos, 3): sep, special, punct
    position = torch.arange(p.shape[-1], device=p.device, dtype=torch.float32)
    distance = (torch.arange(p.shape[-2], device=p.device, dtype=torch.float32)[:, None] - position).abs_()
    columns = [entropy, p[..., 0], flag_mass[..., 0], flag_mass[..., 1], _at_offset(p, 0), _at_offset(p, -1),
               _at_offset(p, 1), flag_mass[..., 2], (p * distance).sum(-1)]
    return torch.stack(columns, dim=-1)


def pack_weights(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int64 keys that order (weight desc, key index asc), -1 for invalid pairs.

    P >= 0, so its float32 bits are monotone as an int; the low 32 bits hold 2^31 - 1 - key_pos
    so that, of equal weights, the smaller key position is the larger key. One integer topk
    (or max) then ranks by weight with ties broken by position, with no separate index array.
    """
    bits = p.contiguous().view(torch.int32).long() << 32
    position = _LOW31 - torch.arange(p.shape[-1], device=p.device)
    return (bits | position).masked_fill_(~valid, -1)


def unpack_weights(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, indices int32) of packed keys; EMPTY_VALUE / EMPTY_INDEX where packed < 0."""
    empty = packed < 0
    values = (packed >> 32).to(torch.int32).view(torch.float32).masked_fill(empty, EMPTY_VALUE)
    indices = (_LOW31 - (packed & 0xFFFFFFFF)).to(torch.int32).masked_fill(empty, EMPTY_INDEX)
    return values, indices


def row_topk(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
             k_top: int, head_mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_top largest weights of each row, descending, ties to the smaller key position.

    Returns (values float32, indices int32), each (batch, head, query_pos, k_top), or
    (batch, 1, query_pos, k_top) with head_mean=True (ranked on the mean of P over heads).
    Slots beyond a row's valid keys, and every slot of a padded query, hold value -1.0 and
    index -1 (EMPTY_VALUE, EMPTY_INDEX); a valid key whose weight underflowed to 0 is kept.
    """
    if k_top < 1:
        raise ValueError(f"k_top must be >= 1; got {k_top}")
    p, _, valid = _probs(q, k, lse, scaling, lengths, causal, window)
    if head_mean:
        p = p.mean(1, keepdim=True)  # (batch, 1, query_pos, key_pos)
    packed = pack_weights(p, valid.expand_as(p))
    top = packed.topk(min(k_top, packed.shape[-1]), dim=-1).values  # sorted, largest first
    top = torch.nn.functional.pad(top, (0, k_top - top.shape[-1]), value=-1)
    return unpack_weights(top)


def head_mean_map(q, k, lse, *, scaling: float, lengths: torch.Tensor, causal: bool, window: int | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(batch, query_pos, key_pos) mean over heads of P, in out_dtype; zeros outside valid pairs."""
    p, _, _ = _probs(q, k, lse, scaling, lengths, causal, window)
    return p.mean(1).to(out_dtype)
