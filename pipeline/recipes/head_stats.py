"""Per-head statistics of Clark et al. 2019, "What Does BERT Look At?"."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import LayerAttention


def _mean_over_queries(per_query: torch.Tensor, att: LayerAttention) -> torch.Tensor:
    """(batch, head, query_pos) -> (batch, head): mean over the real (unpadded) queries."""
    valid = att.masks.token_valid[:, None, :].to(per_query.dtype)
    return (per_query * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)


def head_stats(att: LayerAttention) -> dict[str, torch.Tensor]:
    """One row per window x layer x head, each a mean over the window's real query tokens:

    entropy (nats) and entropy_norm (divided by ln of the number of keys the query sees; 0 when it
    sees one key); first_mass (on position 0, [CLS] or the first token); sep_mass (on separator /
    end tokens); special_mass (on any special token); self_mass, prev_mass, next_mass (on the
    query itself, the token before, the token after); punct_mass (on punctuation tokens);
    mean_distance (expected |query_pos - key_pos| in tokens).
    """
    m = att.masks
    p = att.clean  # (batch, head, query_pos, key_pos), zero outside valid pairs
    n_keys = m.pair_valid.sum(-1).float()  # (batch, 1, query_pos)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    log_n = torch.where(n_keys > 1, n_keys.clamp_min(2).log(), torch.full_like(n_keys, math.inf))
    distance = (m.positions[:, None] - m.positions[None, :]).abs().float()  # (query_pos, key_pos)
    per_query = {
        "entropy": entropy,
        "entropy_norm": entropy / log_n,
        "first_mass": p[..., 0],
        "sep_mass": (p * m.sep[:, None, None, :]).sum(-1),
        "special_mass": (p * m.special[:, None, None, :]).sum(-1),
        "self_mass": p.diagonal(dim1=-2, dim2=-1),
        "prev_mass": F.pad(p.diagonal(offset=-1, dim1=-2, dim2=-1), (1, 0)),
        "next_mass": F.pad(p.diagonal(offset=1, dim1=-2, dim2=-1), (0, 1)),
        "punct_mass": (p * m.punct[:, None, None, :]).sum(-1),
        "mean_distance": (p * distance).sum(-1),
    }
    batch, heads = p.shape[:2]
    cols = {"batch_index": torch.arange(batch, device=p.device).repeat_interleave(heads),
            "head": torch.arange(heads, device=p.device).repeat(batch),
            "window_tokens": m.lengths.repeat_interleave(heads)}
    cols.update({name: _mean_over_queries(v, att).reshape(-1) for name, v in per_query.items()})
    return cols
