"""Attention capture without `output_attentions=True`: the per-layer seam.

We register an attention function named "attnpipe" in transformers' AttentionInterface. Each
attention module calls it once per forward pass with its query and key (rotary embeddings
already applied), value, mask and scaling. It hands the active sink a `LayerInputs` (those
inputs, the site key, the grouping of query heads onto key/value heads) and returns the layer's
output, computed by one of two backends:

- "eager": the model's own eager attention. Its probabilities are kept on the LayerInputs, so
  recipes that need them get them without a second computation.
- "sdpa": torch's scaled_dot_product_attention (flash or memory-efficient kernels, on CUDA and
  on the CPU). Probabilities are then computed only if a recipe asks for them, once per layer,
  from q and k (`LayerInputs.probs`), or for a few windows at a time (`probs_rows`, what the CPU
  path uses so that they stay in cache), or not at all when the fused Triton kernels reduce q
  and k directly.

No weights are returned to the model, so no layer's map outlives its own layer.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..errors import ModelError
from .sites import SiteKey, module_names, site_key

BACKEND = "attnpipe"
BACKENDS = ("eager", "sdpa")


@dataclass
class LayerInputs:
    """What one attention call hands the recipes. Shapes: query (batch, head, query_pos, dim),
    key (batch, kv_head, key_pos, dim), mask additive (batch, 1 or head, query_pos, key_pos)."""

    site: SiteKey
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    mask: torch.Tensor | None
    position_bias: torch.Tensor | None
    n_rep: int  # query heads per key/value head (grouped-query attention)
    causal: bool
    sliding_window: int | None
    given: torch.Tensor | None = field(default=None, repr=False)  # probabilities the backend computed

    @cached_property
    def probs(self) -> torch.Tensor:
        """(batch, head, query_pos, key_pos) float32: softmax(q k^T * scaling + bias + mask),
        computed at most once per layer."""
        if self.given is not None:
            return self.given
        return self.probs_rows(0, self.query.shape[0])

    def probs_rows(self, lo: int, hi: int) -> torch.Tensor:
        """The probabilities of windows lo..hi only: a view when the backend computed them, else
        computed from those windows' q and k (a few windows at a time stay in cache on a CPU)."""
        if self.given is not None:
            return self.given[lo:hi]
        rows = lambda t: t if t.shape[0] == 1 else t[lo:hi]  # noqa: E731 (broadcast masks stay whole)
        key = self.key[lo:hi]
        if self.n_rep > 1:
            key = key.repeat_interleave(self.n_rep, dim=1)
        scores = torch.matmul(self.query[lo:hi].float(), key.float().transpose(-1, -2)).mul_(self.scaling)
        if self.position_bias is not None:
            scores += rows(self.position_bias).float()
        if self.mask is not None:
            scores += rows(self.mask).float()
        return torch.softmax(scores, dim=-1)


# (inputs of one layer) -> None
LayerSink = Callable[[LayerInputs], None]


class _Session:
    def __init__(self, sink: LayerSink, backend: str, names: dict[int, str], causal: bool | None):
        self.sink, self.backend, self.names, self.causal = sink, backend, names, causal


_ACTIVE: ContextVar["_Session | None"] = ContextVar("attnpipe_capture", default=None)
_EAGER: dict[type, Callable] = {}


def _eager_for(module: torch.nn.Module) -> Callable:
    kind = type(module)
    if kind not in _EAGER:
        fn = getattr(sys.modules[kind.__module__], "eager_attention_forward", None)
        if fn is None:
            raise ModelError(f"{kind.__name__} has no eager_attention_forward in "
                             f"{kind.__module__}; this architecture is not supported yet")
        _EAGER[kind] = fn
    return _EAGER[kind]


def attnpipe_attention(module, query, key, value, attention_mask, **kwargs):
    """Drop-in attention function: the layer's output, and its inputs to the sink."""
    session = _ACTIVE.get()
    if session is None or session.backend == "eager" or kwargs.get("softcap") is not None \
            or kwargs.get("s_aux") is not None:
        output, probs = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    else:
        output, probs = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if session is not None:
        scaling = kwargs.get("scaling")
        session.sink(LayerInputs(
            site=site_key(module, session.names, session.causal), query=query, key=key,
            scaling=query.shape[-1] ** -0.5 if scaling is None else float(scaling), mask=attention_mask,
            position_bias=kwargs.get("position_bias"), n_rep=query.shape[1] // key.shape[1],
            causal=bool(getattr(module, "is_causal", False)), sliding_window=kwargs.get("sliding_window"),
            given=None if probs is None else probs))
    return output, None


AttentionInterface.register(BACKEND, attnpipe_attention)
AttentionMaskInterface.register(BACKEND, eager_mask)  # eager's additive float mask, for both backends


@contextmanager
def capture_layers(sink: LayerSink, backend: str = "eager", model: torch.nn.Module | None = None,
                   causal: bool | None = None) -> Iterator[None]:
    """Route every attention call inside the block to `sink(LayerInputs)`; `model` names the
    modules for site keys (layer indices from the modules themselves otherwise)."""
    token = _ACTIVE.set(_Session(sink, backend, module_names(model) if model is not None else {}, causal))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def capturing(sink: Callable[[int, torch.Tensor], None], backend: str = "eager",
              model: torch.nn.Module | None = None) -> Iterator[None]:
    """`sink(layer, probs)` for every self-attention layer: the probabilities-only view."""
    with capture_layers(lambda inputs: sink(inputs.site.layer, inputs.probs), backend, model):
        yield


__all__ = ["BACKEND", "BACKENDS", "LayerInputs", "SiteKey", "capture_layers", "capturing", "site_key"]
