"""Saliency recipes: attention weighted by the gradient of a chosen scalar F.

A recipe here gets a `LayerSaliency`: one layer's probabilities A and a gradient G of F with
respect to them, both (batch, head, query_pos, key_pos), from the gradient driver
(pipeline/control/gradients.py, which also defines F). Its attribution is A * G on real
(query, key) pairs, zero elsewhere:

- attn_grad: G = dF/dA at the model's own attention (attention x gradient).
- attn_ig: G = (1/m) sum_{j=1..m} dF(j/m * A_l)/dA_l, Hao et al. 2021's integrated gradients with
  an m-step right Riemann sum (rule "midpoint": alpha = (j - 1/2)/m), where only layer l's
  probabilities are scaled (the layers above it recompute theirs from what they receive).
  Completeness: summed over heads and pairs, the attribution approaches F(A) - F(0_l), F(0_l)
  being F with layer l's probabilities all zero.
- grad_rollout: Chefer et al. 2021's rollout of mean_h (A * G)^+ with G = dF/dA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .attention import HEAD_MEAN, BatchMasks


@dataclass
class LayerSaliency:
    """One self-attention layer's probabilities and gradients for a slice of a batch."""

    layer: int
    masks: BatchMasks
    probs: torch.Tensor  # A (batch, head, query_pos, key_pos) float32, as the model computed it
    grad: torch.Tensor  # G (batch, head, query_pos, key_pos): dF/dA, or its mean along alpha * A (attn_ig)
    scalar: torch.Tensor  # (batch,) F at the model's own attention
    baseline: torch.Tensor | None = None  # (batch,) F with this layer's probabilities zero (attn_ig)

    @cached_property
    def attribution(self) -> torch.Tensor:  # (batch, head, query_pos, key_pos), zero off real pairs
        return (self.probs * self.grad).masked_fill_(~self.masks.pair_valid, 0.0)

    @cached_property
    def completeness_error(self) -> torch.Tensor:  # (batch,)
        """sum of the attributions - (F(A) - F(0_l)): the Riemann sum's error (attn_ig only)."""
        return self.attribution.sum((1, 2, 3)) - (self.scalar - self.baseline)


def _top_edges(sal: LayerSaliency, k: int) -> dict[str, torch.Tensor]:
    """The k keys of each real query with the largest |attribution|, per head."""
    attr = sal.attribution
    score = attr.abs().masked_fill(~sal.masks.pair_valid, float("-inf"))
    top, key_pos = score.topk(min(k, score.shape[-1]), dim=-1)  # (batch, head, query_pos, k)
    b, h, q, j = (top != float("-inf")).nonzero(as_tuple=True)
    key = key_pos[b, h, q, j]
    return {"batch_index": b, "head": h, "query_pos": q, "key_pos": key,
            "attribution": attr[b, h, q, key], "weight": sal.probs[b, h, q, key]}


def _head_totals(sal: LayerSaliency) -> dict[str, torch.Tensor]:
    """One row per window and head: the attribution summed over real pairs, signed and absolute,
    and F."""
    batch, heads = sal.probs.shape[:2]
    attr = sal.attribution
    b = torch.arange(batch, device=attr.device).repeat_interleave(heads)
    return {"batch_index": b, "head": torch.arange(heads, device=attr.device).repeat(batch),
            "attribution_sum": attr.sum((2, 3)).flatten(), "attribution_abs": attr.abs().sum((2, 3)).flatten(),
            "scalar": sal.scalar[b].float()}


def attn_grad(sal: LayerSaliency, *, k: int) -> dict[str, torch.Tensor]:
    """Attention x gradient: A * dF/dA per head, its top k keys per query by |value|.

    Rows (saliency table): head, query_pos, key_pos, attribution (signed A * dF/dA) and weight (A).
    F is the recipe's scalar: pooled_norm (encoders), logprob (decoders, summed or last), token
    (a target token's log-probability after the window) or class (a classifier's logit); see
    pipeline/control/scalars.py. attn_grad_heads stores the per-head totals.
    """
    return _top_edges(sal, k)


def attn_grad_heads(sal: LayerSaliency) -> dict[str, torch.Tensor]:
    """Per-head totals of attention x gradient: one row per window x layer x head.

    attribution_sum: sum of A * dF/dA over the window's real (query, key) pairs; attribution_abs:
    the sum of its absolute values; scalar: F of the window (same on every row of a window).
    Shares its backward pass with attn_grad and grad_rollout when their scalar is the same.
    """
    return _head_totals(sal)


def attn_ig(sal: LayerSaliency, *, k: int) -> dict[str, torch.Tensor]:
    """Integrated gradients over attention (Hao et al. 2021), top k keys per query by |value|.

    For layer l: A_l * (1/m) sum_{j=1..m} dF(alpha_j A_l)/dA_l, m = steps (default 20), where
    only layer l's probabilities are replaced by alpha_j * A_l and every other layer runs as
    usual; alpha_j = j/m (rule "right", Hao et al.) or (j - 1/2)/m (rule "midpoint": the same
    cost, error O(1/m^2) instead of O(1/m)). Costs (steps + 1) forward passes per layer and
    steps backward passes. Rows as attn_grad; the completeness error is in attn_ig_heads.
    """
    return _top_edges(sal, k)


def attn_ig_heads(sal: LayerSaliency) -> dict[str, torch.Tensor]:
    """Per-head totals of attn_ig, with its completeness check: one row per window x layer x head.

    attribution_sum, attribution_abs, scalar as attn_grad_heads; scalar_baseline: F with layer l's
    probabilities zero, F(0_l); completeness_error: (sum over heads of attribution_sum) -
    (scalar - scalar_baseline), the same on every head row of a window and layer. It shrinks as
    steps grows: O(1/steps) for rule "right", O(1/steps^2) for "midpoint".
    """
    cols = _head_totals(sal)
    b = cols["batch_index"]
    cols["scalar_baseline"] = sal.baseline[b].float()
    cols["completeness_error"] = sal.completeness_error[b].float()
    return cols


def grad_rollout(sal: LayerSaliency, carry: torch.Tensor | None, *, k: int
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient-weighted attention rollout (Chefer et al. 2021), its top k keys per query.

    Per layer: Abar = mean over heads of (A * dF/dA)^+, then Abar + I with rows renormalised,
    multiplied onto the product of the layers below (layer 0 is its own). Rows (saliency table):
    head -1, attribution = the rolled-out relevance, weight null. Padded tokens take no part; for
    decoders the product stays lower-triangular.
    """
    m = sal.masks
    mixed = sal.attribution.clamp_min(0.0).mean(1)  # (batch, query_pos, key_pos)
    mixed.diagonal(dim1=-2, dim2=-1).add_(m.token_valid.to(mixed.dtype))
    mixed.div_(mixed.sum(-1, keepdim=True).clamp_min_(1e-12))
    rolled = mixed if carry is None else torch.bmm(mixed, carry)
    scores = rolled.masked_fill(~m.pair_valid[:, 0], float("-inf"))
    top, key_pos = scores.topk(min(k, scores.shape[-1]), dim=-1)  # (batch, query_pos, k)
    b, q, j = (top != float("-inf")).nonzero(as_tuple=True)
    cols = {"batch_index": b, "head": torch.full_like(b, HEAD_MEAN), "query_pos": q,
            "key_pos": key_pos[b, q, j], "attribution": top[b, q, j]}
    return cols, rolled
