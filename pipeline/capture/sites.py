"""Site keys: which attention call a layer's data comes from, built in one function.

A site is (stack, layer, kind): the encoder or decoder stack, the layer index inside it, and
self- or cross-attention, and in generate runs the decoding step. It is read
off the module and its qualified name, never from the order of calls, so cross-attention and
decoder layers interleaved with encoder ones cannot shift the numbering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
_CROSS_NAMES = ("crossattention", "cross_attn", "encoder_attn", "encdecattention", "layer.1.encdecattention")


@dataclass(frozen=True)
class SiteKey:
    stack: str  # "encoder" (also encoder-only models) or "decoder" (also decoder-only models)
    layer: int  # 0-based, within the stack
    kind: str = "self"  # "self" or "cross"
    # generate runs: the decoding step (0 = the prefill; pipeline/generate/decode.py sets it on the
    # inputs it hands its reductions); None for a forward pass
    step: int | None = None


def module_names(model: torch.nn.Module) -> dict[int, str]:
    """id(module) -> qualified name, once per model, for `site_key`."""
    return {id(m): name for name, m in model.named_modules()}


def site_key(module: torch.nn.Module, names: dict[int, str], causal_model: bool | None = None, *,
             kind: str | None = None, layer: int | None = None) -> SiteKey:
    """The one place a site is named. `kind` and `layer` are given by captures that know them
    better than the name does (pipeline/capture/modules.py: nn.TransformerDecoderLayer's
    multihead_attn is cross-attention; torch modules are numbered in model order per stack)."""
    name = names.get(id(module), "")
    lowered = name.lower()
    if kind is None:
        kind = "cross" if getattr(module, "is_cross_attention", False) or any(c in lowered for c in _CROSS_NAMES) \
            else "self"
    if "decoder" in lowered or getattr(module, "is_decoder", False):
        stack = "decoder"
    elif "encoder" in lowered:
        stack = "encoder"
    else:  # a plain stack (GPT-2's h.N, Llama's layers.N): decoder when causal
        stack = "decoder" if causal_model else "encoder"
    if layer is None:
        layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        found = _INDEX.findall(name)
        layer = int(found[0]) if found else 0
    return SiteKey(stack, layer, kind)
