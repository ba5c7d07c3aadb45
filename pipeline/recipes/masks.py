"""The mask extractions people commonly use: top-k, threshold (per head or on the head mean),
and top-p. Each writes rows to the `edges` table. Padded and future (causal) keys never appear.
On cross-attention the keys are the source tokens (key_pos) and the queries the target's.
At level "word" (LayerAttention.words) query_pos and key_pos are word indices.
"""

from __future__ import annotations

import torch

from .attention import LayerAttention, edge_columns


def topk(att: LayerAttention, *, k: int, per_head: bool) -> dict[str, torch.Tensor]:
    """The k strongest key positions of every query (fewer when the query sees fewer than k keys).

    per_head=true: one set per head; false: one set on the mean over heads (head = -1).
    """
    probs = att.select(per_head)  # (batch, head, query_pos, key_pos)
    scores = probs.masked_fill(~att.masks.pair_valid, float("-inf"))
    weight, key_pos = scores.topk(min(k, scores.shape[-1]), dim=-1)  # (batch, head, query_pos, k)
    return edge_columns(weight != float("-inf"), key_pos, weight, per_head)  # isfinite is slow on CPU


def threshold(att: LayerAttention, *, t: float, per_head: bool) -> dict[str, torch.Tensor]:
    """Binary mask of the (query, key) pairs whose weight is strictly greater than t.

    t=0 keeps every pair with any weight; t=1 keeps nothing (weights are at most 1).
    per_head=true: per head; false: on the mean over heads (head = -1).
    """
    probs = att.select(per_head)
    keep = (probs > t) & att.masks.pair_valid
    key_pos = att.masks.key_positions.expand_as(probs)
    return edge_columns(keep, key_pos, probs, per_head)


def topp(att: LayerAttention, *, p: float, per_head: bool) -> dict[str, torch.Tensor]:
    """The smallest set of keys per query, strongest first, whose weights add up to at least p.

    Keys with zero weight are never needed and never kept. per_head as in topk.
    """
    probs = att.select(per_head).masked_fill(~att.masks.pair_valid, -1.0)  # invalid sort last
    weight, key_pos = probs.sort(dim=-1, descending=True, stable=True)
    weight = weight.clamp_min(0.0)
    mass_before = weight.cumsum(dim=-1) - weight  # (batch, head, query_pos, key_pos)
    keep = (mass_before < p) & (weight > 0)
    return edge_columns(keep, key_pos, weight, per_head)
