"""Recipes on a layer's q and k through the fused kernels (`pipeline.kernels`), for the "fused"
attention backend: P is never formed where a kernel can do without it.

- head_stats: the per-query statistics from `row_stats` (one recompute pass after `row_lse`).
- topk: a running top-k over key tiles (`row_topk`), per head or on the head mean.
- rollout, and topp / threshold / dense on the head mean: the head-mean map (`head_mean_map`,
  bfloat16), then the torch recipe on it.
- Per-head threshold, topp and dense need every head's P: it is computed once, from q and k.
Layers the kernels cannot express (a relative position bias such as T5's, an attention sink,
a custom mask, cross-attention) fall back to the torch path. The torch recipes stay the reference: tests compare
the two on the same layers.
"""

from __future__ import annotations

from functools import cached_property

import torch

from .attention import HEAD_MEAN, BatchMasks, LayerAttention, edge_columns
from .head_stats import from_rows


MAX_FUSED_K = 128  # the Triton top-k buffer


class FusedAttention(LayerAttention):
    """A LayerAttention whose head mean and statistics come from the kernels."""

    def __init__(self, layer: int, masks: BatchMasks, inputs, kernels):
        super().__init__(None, layer, masks, inputs)
        self.kernels = kernels

    @property
    def supported(self) -> bool:
        """The kernels know padding, causal masks and causal sliding windows; a position bias, a
        bidirectional sliding window (keys on both sides) or cross-attention (query and key
        lengths differ, the kernels take one length per window) goes to the torch path. So does a
        layer the capture ran on the model's eager attention (`given`: soft-capping as in Gemma2,
        an attention sink), whose scores the kernels cannot form from q and k alone."""
        i = self.inputs
        return (i.position_bias is None and (i.sliding_window is None or self.masks.causal)
                and not self.masks.cross and i.given is None)

    @property
    def _common(self) -> dict:
        i = self.inputs
        return {"scaling": i.scaling, "lengths": self.masks.lengths.to(torch.int32),
                "causal": self.masks.causal, "window": i.sliding_window}

    @cached_property
    def lse(self) -> torch.Tensor:  # (batch, head, query_pos)
        return self.kernels.row_lse(self.inputs.query, self.inputs.key, **self._common)

    @cached_property
    def head_mean(self) -> torch.Tensor:  # (batch, 1, query_pos, key_pos) float32
        if not self.supported:
            return super().head_mean
        mean = self.kernels.head_mean_map(self.inputs.query, self.inputs.key, self.lse, **self._common)
        return mean.float()[:, None].masked_fill(~self.masks.pair_valid, 0.0)

    @cached_property
    def key_flags(self) -> torch.Tensor:  # (batch, key_pos) uint8: 1 special, 2 sep, 4 punct
        return key_flags(self.masks)


def key_flags(m: BatchMasks) -> torch.Tensor:
    """(batch, key_pos) uint8 flags of the keys (kernels/reference.py): 1 special, 2 sep, 4 punct."""
    return m.special.to(torch.uint8) | (m.sep.to(torch.uint8) << 1) | (m.punct.to(torch.uint8) << 2)


def head_stats(att: FusedAttention) -> dict[str, torch.Tensor]:
    """head_stats (see its torch recipe) from the kernels' per-query statistics."""
    stats = att.kernels.row_stats(att.inputs.query, att.inputs.key, att.lse, key_flags=att.key_flags,
                                  **att._common)  # (batch, head, query_pos, 9)
    return from_rows(att.masks, stats)


def topk(att: FusedAttention, *, k: int, per_head: bool) -> dict[str, torch.Tensor]:
    """topk (see its torch recipe) from the kernels' running top-k (up to 128 keys per query;
    more come from the torch recipe)."""
    k_top = min(k, att.inputs.key.shape[-2])
    if k_top > MAX_FUSED_K:
        from .masks import topk as torch_topk

        return torch_topk(att, k=k, per_head=per_head)
    weight, key_pos = att.kernels.row_topk(att.inputs.query, att.inputs.key, att.lse, k_top=k_top,
                                           head_mean=not per_head, **att._common)
    cols = edge_columns(key_pos >= 0, key_pos.long(), weight, per_head)
    if not per_head:
        cols["head"] = torch.full_like(cols["head"], HEAD_MEAN)
    return cols


FUSED = {"head_stats": head_stats, "topk": topk}
