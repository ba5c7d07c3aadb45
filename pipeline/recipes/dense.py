"""Full attention maps, opt-in, for short documents (inspection and plots)."""

from __future__ import annotations

import torch

from .attention import HEAD_MEAN, LayerAttention


def dense(att: LayerAttention, *, max_tokens: int, per_head: bool) -> dict[str, torch.Tensor]:
    """Every weight of windows with at most max_tokens tokens: one row per query, `weights` holds
    its keys in order (key_pos 0..n-1; for causal models only keys 0..query_pos). Cross-attention:
    pairs whose source and target both have at most max_tokens tokens, keys the source's 0..n-1.

    per_head=true: every head; false: only the mean over heads (head = -1).
    level = "word": rows and keys are words, and max_tokens counts words.
    """
    m = att.masks
    probs = att.select(per_head)  # (batch, head, query_pos, key_pos)
    chosen = ((m.lengths <= max_tokens) & (m.key_side.lengths <= max_tokens))[:, None, None, None]
    keep = m.pair_valid.expand_as(probs) & chosen
    rows = keep.any(-1)  # (batch, head, query_pos)
    b, h, q = rows.nonzero(as_tuple=True)
    return {"batch_index": b, "head": h if per_head else torch.full_like(h, HEAD_MEAN),
            "query_pos": q, "weights.values": probs[keep].float(),
            "weights.lengths": keep.sum(-1)[rows]}
