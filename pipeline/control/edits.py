"""An intervention as edits at the capture seam (pipeline/capture: `editing`, `LayerEdit`).

Before the softmax, an intervention adds a value to the scores of its keys in its layers and
heads: scale adds log(alpha) (PASTA's "scale the attention by alpha"), zero adds -inf (the key
is removed and the rest renormalised), bias adds `value`. With except_keys every real key but
the named ones is acted on (PASTA emphasises a span by scaling down all others). After the
softmax, patch replaces a head's probabilities by the ones the same head computed on the
document's paired text (recorded by an unedited pass over the paired texts, `donor_probs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..capture import LayerEdit, LayerInputs, SiteKey, capture_layers
from ..job import InterventionSpec


def op_value(spec: InterventionSpec) -> float:
    """What an op adds to a chosen key's score: log(alpha), -inf or the bias value."""
    if spec.op == "scale":
        return math.log(spec.alpha)
    if spec.op == "bias":
        return float(spec.value)
    return -math.inf  # zero: the key is removed, the rest renormalised


def head_flags(chosen: list[int] | str, count: int, device: torch.device) -> torch.Tensor:
    """(count,) bool: the chosen numbers ("all": every one)."""
    flags = torch.zeros(count, dtype=torch.bool, device=device)
    flags[slice(None) if chosen == "all" else chosen] = True
    return flags


@dataclass
class Edit:
    """One intervention on one batch: the LayerEditor that `capture.editing` calls per layer."""

    spec: InterventionSpec
    num_heads: int
    selected: torch.Tensor | None = None  # (batch, key_pos) bool: keys whose scores change
    donor: dict[int, torch.Tensor] | None = None  # patch: layer -> (batch, head, query_pos, key_pos)
    patch_rows: torch.Tensor | None = None  # patch: (batch,) bool, windows that have a paired pattern

    def heads_of(self, layer: int) -> list[int] | str | None:
        """The heads edited in `layer` ("all"), None when the layer is not edited."""
        spec = self.spec
        if spec.layer_heads is not None:
            return [h for l, h in spec.layer_heads if l == layer] or None
        return spec.heads if spec.layers == "all" or layer in spec.layers else None

    def __call__(self, site: SiteKey, query: torch.Tensor, mask: torch.Tensor | None) -> LayerEdit | None:
        chosen_heads = self.heads_of(site.layer) if site.kind == "self" else None
        if chosen_heads is None:
            return None
        heads = head_flags(chosen_heads, query.shape[1], query.device)  # (head,)
        if self.spec.op == "patch":
            return LayerEdit(patch=self.donor[site.layer], patch_heads=self.patch_rows[:, None] & heads[None, :])
        q = query.shape[2]
        selected = _fit(self.selected, mask.shape[-1] if mask is not None else self.selected.shape[1])
        k = selected.shape[1]
        chosen = selected[:, None, None, :] & heads[None, :, None, None]  # (batch, head, 1, key_pos)
        bias = torch.zeros(chosen.shape[0], query.shape[1], q, k, device=query.device, dtype=torch.float32)
        return LayerEdit(bias=bias.masked_fill_(chosen, op_value(self.spec)))


def _fit(selected: torch.Tensor, keys: int) -> torch.Tensor:
    """(batch, keys): the selection over the first keys, unselected past them (the tokens a
    generate run adds to its KV cache after the prompt)."""
    if selected.shape[1] >= keys:
        return selected[:, :keys]
    return torch.nn.functional.pad(selected, (0, keys - selected.shape[1]), value=False)


def donor_probs(lm, ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int] | str
                ) -> dict[int, torch.Tensor]:
    """layer -> (batch, head, query_pos, key_pos): each self-attention layer's probabilities on
    the paired texts (an unedited pass), for patching."""
    kept: dict[int, torch.Tensor] = {}

    def sink(inputs: LayerInputs) -> None:
        if inputs.site.kind == "self" and (layers == "all" or inputs.site.layer in layers):
            kept[inputs.site.layer] = inputs.probs

    with capture_layers(sink, backend="eager", model=lm.model, causal=lm.causal):
        lm.forward(ids, attention_mask)
    return kept
