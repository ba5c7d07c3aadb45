"""Per-head statistics of Clark et al. 2019, "What Does BERT Look At?"."""

from __future__ import annotations

import math

import torch

from .attention import LayerAttention

def _keys_seen(m) -> torch.Tensor:
    """(batch, query_pos) how many keys each query sees: the window's (for cross-attention the
    source's) length, or up to itself."""
    n = m.key_side.lengths[:, None].expand(-1, m.size)
    return torch.minimum(n, m.positions[None, :] + 1) if m.causal and not m.cross else n


def head_stats(att: LayerAttention) -> dict[str, torch.Tensor]:
    """One row per window x layer x head, each a mean over the window's real query tokens:

    entropy (nats) and entropy_norm (divided by ln of the number of keys the query sees; 0 when it
    sees one key); first_mass (on position 0, [CLS] or the first token); sep_mass (on separator /
    end tokens); special_mass (on any special token); self_mass, prev_mass, next_mass (on the
    query itself, the token before, the token after); punct_mass (on punctuation tokens);
    mean_distance (expected |query_pos - key_pos| in tokens).

    Cross-attention (target queries, source keys): the key sets are the source's, and self_mass,
    prev_mass, next_mass and mean_distance are left out (null), since a target position and a
    source position are places in two different sequences.

    level = "word": the same on words (first_mass on word 0; sep/special/punct on words all of whose
    pieces are; self/prev/next on neighbouring words; mean_distance in words); window_tokens counts
    the window's words.
    """
    m = att.masks
    # Only each window's means over its real queries are kept, so each statistic is one pass
    # over P (the callers hand a CPU a few windows at a time, so P is in cache for all of them),
    # averaged over the queries before anything else: the entropy comes with the probabilities
    # (LayerAttention.entropy); the fixed key sets from each key's weight averaged over the
    # queries (one vector-matrix product per head: 0.18 ms against 1.35 for P times the sets,
    # 10 x 12 x 128 x 128); distance as one product; self, previous and next off three diagonals.
    # The weights (batch, query_pos) are 1 / length on real queries, exact zeros on padded rows
    # (their values are finite, from the softmax). A block of a long window's queries
    # (BatchMasks.queries) weighs its queries by the window's count, so the blocks' rows add up
    # to the window's means (reduce.py sums them).
    entropy = att.entropy()  # (batch, head, query_pos)
    p = att.clean  # (batch, head, query_pos, key_pos), zero on padded and future keys
    batch, heads, size, _ = p.shape
    weights = m.token_valid.to(p.dtype) / m.lengths[:, None].clamp_min(1).to(p.dtype)
    n_keys = _keys_seen(m).to(p.dtype)  # (batch, query_pos)
    log_n = torch.where(n_keys > 1, n_keys.clamp_min(2).log(), torch.full_like(n_keys, math.inf))
    e = torch.matmul(entropy, torch.stack([weights, weights / log_n], dim=-1))  # (batch, head, 2)
    keys = m.key_side
    first = torch.zeros_like(keys.sep)
    first[:, 0] = True
    key_sets = torch.stack([first, keys.sep, keys.special, keys.punct], dim=-1).to(p.dtype)  # (batch, key_pos, 4)
    per_key = torch.matmul(weights[:, None, None, :], p)  # (batch, head, 1, key_pos)
    f = torch.matmul(per_key, key_sets[:, None])[:, :, 0]  # (batch, head, 4)
    named = {"entropy": e[..., 0], "entropy_norm": e[..., 1], "first_mass": f[..., 0], "sep_mass": f[..., 1],
             "special_mass": f[..., 2], "punct_mass": f[..., 3]}
    if not m.cross:
        queries, key_positions = m.positions.to(p.dtype), m.key_positions.to(p.dtype)
        distance = torch.mul(p, (queries[:, None] - key_positions[None, :]).abs_()).sum(-1)  # (batch, head, query_pos)
        named.update(mean_distance=(distance * weights[:, None]).sum(-1), self_mass=_diagonal(p, weights, m.offset),
                     prev_mass=_diagonal(p, weights, m.offset - 1), next_mass=_diagonal(p, weights, m.offset + 1))
    cols = {"batch_index": torch.arange(batch, device=p.device).repeat_interleave(heads),
            "head": torch.arange(heads, device=p.device).repeat(batch),
            "window_tokens": m.lengths.repeat_interleave(heads)}
    cols.update({name: named[name].reshape(-1) for name in STATS if name in named})
    return cols


def from_rows(m, stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """head_stats from per-query statistics (batch, head, query_pos, 9) in the order of
    kernels.reference.STATS (the Triton and the compiled CPU kernels give them), zero on padded
    queries: the same means as head_stats, each query weighted 1 / the window's length (a
    block of a long window's queries adds up with the others, as in head_stats)."""
    from ..kernels.reference import STATS as ROW_STATS

    batch, heads = stats.shape[:2]
    weights = m.token_valid.float() / m.lengths[:, None].clamp_min(1).float()  # (batch, query_pos)
    n_keys = _keys_seen(m).float()
    log_n = torch.where(n_keys > 1, n_keys.clamp_min(2).log(), torch.full_like(n_keys, math.inf))
    means = torch.matmul(weights[:, None, None, :], stats)[:, :, 0]  # (batch, head, 9)
    named = {name: means[..., i] for i, name in enumerate(ROW_STATS)}
    named["entropy_norm"] = torch.matmul(stats[..., 0], (weights / log_n)[..., None])[..., 0]
    if m.cross:
        for name in ("self_mass", "prev_mass", "next_mass", "mean_distance"):
            del named[name]
    cols = {"batch_index": torch.arange(batch, device=stats.device).repeat_interleave(heads),
            "head": torch.arange(heads, device=stats.device).repeat(batch),
            "window_tokens": m.lengths.repeat_interleave(heads)}
    cols.update({name: named[name].reshape(-1) for name in STATS if name in named})
    return cols


def _diagonal(p: torch.Tensor, weights: torch.Tensor, shift: int) -> torch.Tensor:
    """(batch, head): the weighted mean over queries of row i's weight on key i + shift (0 where
    there is no such key): self (the block's offset), previous and next token, off one diagonal
    of the block."""
    rows, keys = p.shape[-2:]
    first = max(0, -shift)  # the first row whose key exists
    count = max(0, min(rows, keys - shift) - first)
    if not count:
        return p.new_zeros(p.shape[:2])
    return (p.diagonal(shift, -2, -1)[..., :count] * weights[:, None, first: first + count]).sum(-1)


STATS = ("entropy", "entropy_norm", "first_mass", "sep_mass", "special_mass", "self_mass", "prev_mass",
         "next_mass", "punct_mass", "mean_distance")
