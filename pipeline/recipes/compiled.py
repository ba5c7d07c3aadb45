"""Recipes on the CPU through the compiled kernel (kernels/cpu_attn.c).

One pass over each attention row of a few windows gives everything the recipes of a job read:
the layer's output rows (so no SDPA runs for the layer), each query's statistics (head_stats),
each query's strongest keys per head and on the mean over heads (topk), the head-mean map
(rollout; threshold, topp, dense and groups with per_head = false), and every head's
probabilities only when a recipe reads them (the other per-head recipes, word level). The torch
recipes then run unchanged on those tensors, except head_stats, which averages the kernel's
per-query statistics (head_stats.from_rows), and topk, which takes the kernel's keys.

reduce.reduce_layer uses it for a layer whose inputs the kernel takes
(capture.LayerInputs.kernel_masking) and whose windows it masks as the batch's masks say;
other layers run the torch ops, and tests compare the two on the same layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from .attention import BatchMasks, LayerAttention, edge_columns
from .fused import key_flags
from .head_stats import from_rows
from .masks import topk as torch_topk


MAX_KERNEL_K = 128  # top keys the kernel selects per row; more come from the torch recipe


@dataclass(frozen=True)
class Needs:
    """What the kernel computes for a job's recipes: per-query statistics, the head-mean map,
    every head's map, and the most top keys any top-k recipe asks for, per head and on the mean
    (a recipe asking for fewer takes the first of them)."""

    stats: bool = False
    mean: bool = False
    probs: bool = False
    topk_head: int = 0
    topk_mean: int = 0


def kernel_needs(recipes: list[dict]) -> Needs:
    """The union of what a job's (validated) recipes read, for the kernel to compute in one call."""
    needs = {"stats": False, "mean": False, "probs": False, "topk_head": 0, "topk_mean": 0}
    for spec in recipes:
        per_head = spec.get("per_head")
        if spec.get("level") == "word":
            needs["probs"] = True  # word pooling reads every head's map
        elif spec["name"] == "head_stats":
            needs["stats"] = True
        elif spec["name"] == "topk" and spec["k"] <= MAX_KERNEL_K:
            kind = "topk_head" if per_head else "topk_mean"
            needs[kind] = max(needs[kind], spec["k"])
        elif spec["name"] == "rollout" or per_head is False:
            needs["mean"] = True
        else:
            needs["probs"] = True
    return Needs(**needs)


class CompiledAttention(LayerAttention):
    """A LayerAttention whose output rows, statistics, head mean and probabilities come from
    one kernel call (`needs` says which); what was not asked for is computed when first read."""

    def __init__(self, layer: int, masks: BatchMasks, inputs, rows: tuple[int, int] | None, needs: Needs):
        super().__init__(None, layer, masks, inputs, rows=rows)
        self.needs = needs

    def _call(self, **asked) -> dict[str, torch.Tensor]:
        lo, hi, q0, q1, k1 = self._span
        return self.inputs.compiled_rows(lo, hi, q0, q1, k1, flags=key_flags(self.masks.key_side), **asked)

    @cached_property
    def computed(self) -> dict[str, torch.Tensor]:
        """The one call: the layer's output rows and what `needs` names."""
        return self._call(**asdict(self.needs))

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.computed:  # read by a recipe `needs` did not foresee: one more pass
            self.computed[name] = self._call(output=False, **{name: True})[name]
        return self.computed[name]

    @cached_property
    def probs(self) -> torch.Tensor:  # (batch, head, query_pos, key_pos), zero on masked keys
        return self._get("probs")

    @cached_property
    def head_mean(self) -> torch.Tensor:  # (batch, 1, query_pos, key_pos)
        return self._get("mean")[:, None]

    def row_stats(self) -> torch.Tensor:  # (batch, head, query_pos, 9), kernels.reference.STATS
        return self._get("stats")

    def entropy(self) -> torch.Tensor:
        return self.row_stats()[..., 0]

    def top_keys(self, k: int, per_head: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weights, key positions) of each query's k strongest keys, (batch, head or 1, query_pos,
        k), -1 in empty slots; None when the call did not select that many."""
        name = "topk_head" if per_head else "topk_mean"
        if k > getattr(self.needs, name):
            return None
        weight, position = self.computed[name]
        return weight[..., :k], position[..., :k]


def head_stats(att: CompiledAttention) -> dict[str, torch.Tensor]:
    """head_stats (see its torch recipe) from the kernel's per-query statistics."""
    return from_rows(att.masks, att.row_stats())


def topk(att: CompiledAttention, *, k: int, per_head: bool) -> dict[str, torch.Tensor]:
    """topk (see its torch recipe) from the keys the kernel selected."""
    top = att.top_keys(k, per_head)
    if top is None:
        return torch_topk(att, k=k, per_head=per_head)
    weight, position = top
    return edge_columns(position >= 0, position.long(), weight, per_head)


COMPILED = {"head_stats": head_stats, "topk": topk}
