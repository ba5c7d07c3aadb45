"""Recipes on the CPU through the compiled kernel (kernels/cpu_attn.c).

One pass over each attention row of a few windows gives everything the recipes of a job read:
the layer's output rows (so no SDPA runs for the layer), each query's statistics (head_stats),
the mean over heads (topk, threshold, topp, dense and groups with per_head = false, rollout),
and every head's probabilities only when a recipe reads them (per-head recipes, word level).
The torch recipes then run unchanged on those tensors, except head_stats, which averages the
kernel's per-query statistics (head_stats.from_rows).

reduce.reduce_layer uses it for a layer whose inputs the kernel takes
(capture.LayerInputs.kernel_masking) and whose windows it masks as the batch's masks say;
other layers run the torch ops, and tests compare the two on the same layers.
"""

from __future__ import annotations

from functools import cached_property

import torch

from .attention import BatchMasks, LayerAttention
from .fused import key_flags
from .head_stats import from_rows


def kernel_needs(recipes: list[dict]) -> frozenset[str]:
    """What the kernel computes for a job's recipes: "stats", "mean", "probs" (every head's map)."""
    needs = set()
    for spec in recipes:
        if spec.get("level") == "word":
            needs.add("probs")  # word pooling reads every head's map
        elif spec["name"] == "head_stats":
            needs.add("stats")
        elif spec["name"] == "rollout" or spec.get("per_head") is False:
            needs.add("mean")
        else:
            needs.add("probs")
    return frozenset(needs)


class CompiledAttention(LayerAttention):
    """A LayerAttention whose output rows, statistics, head mean and probabilities come from
    one kernel call (`needs` says which); what was not asked for is computed when first read."""

    def __init__(self, layer: int, masks: BatchMasks, inputs, rows: tuple[int, int] | None,
                 needs: frozenset[str]):
        super().__init__(None, layer, masks, inputs, rows=rows)
        self.needs = needs

    def _call(self, **asked) -> dict[str, torch.Tensor]:
        lo, hi, q0, q1, k1 = self._span
        return self.inputs.compiled_rows(lo, hi, q0, q1, k1, flags=key_flags(self.masks.key_side), **asked)

    @cached_property
    def computed(self) -> dict[str, torch.Tensor]:
        """The one call: the layer's output rows and what `needs` names."""
        return self._call(stats="stats" in self.needs, mean="mean" in self.needs, probs="probs" in self.needs)

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


def head_stats(att: CompiledAttention) -> dict[str, torch.Tensor]:
    """head_stats (see its torch recipe) from the kernel's per-query statistics."""
    return from_rows(att.masks, att.row_stats())


COMPILED = {"head_stats": head_stats}
