"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers")."""

from __future__ import annotations

import torch

from .attention import LayerAttention, edge_columns


def rollout(att: LayerAttention, carry: torch.Tensor | None, *, k: int
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rolled-out attention up to each layer, stored as its top k keys per query.

    Per layer: the head mean A, then 0.5*A + 0.5*I with rows renormalised, multiplied onto the
    product of the layers below (layer 0 is its own rollout). Padded tokens take no part; for
    causal models the product stays lower-triangular, so no future key is stored.
    level = "word": rollout over word-pooled maps (each layer's head mean pooled onto words first).
    """
    m = att.masks
    mean = att.head_mean[:, 0]  # (batch, query_pos, key_pos)
    mixed = mean.mul(0.5)  # 0.5*A + 0.5*I (identity on real tokens only), in place: one pass
    mixed.diagonal(dim1=-2, dim2=-1).add_(m.token_valid.to(mixed.dtype), alpha=0.5)
    mixed.div_(mixed.sum(-1, keepdim=True).clamp_min_(1e-12))
    rolled = mixed if carry is None else torch.bmm(mixed, carry)  # (batch, query_pos, key_pos)
    scores = rolled.masked_fill(~m.pair_valid[:, 0], float("-inf"))[:, None]
    weight, key_pos = scores.topk(min(k, scores.shape[-1]), dim=-1)
    cols = edge_columns(weight != float("-inf"), key_pos, weight, per_head=False)
    del cols["head"]
    return cols, rolled
