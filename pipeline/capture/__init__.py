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

Interventions (pipeline/control) act at the same seam, inside `editing(editor)`: the editor
returns a `LayerEdit` for a site, or None. Its `bias` is added to the additive mask before the
softmax (the mask every backend already takes for padding and causality, expanded from
(batch, 1, q, k) to (batch, head, q, k) only for an edited layer), so both backends apply it. Its
`patch` replaces chosen heads' probabilities after the softmax; that layer then runs on the eager
path here (softmax, replace, probabilities x values), whatever the backend.
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


@dataclass
class LayerEdit:
    """An intervention on one attention call. bias: (batch, head, query_pos, key_pos) added before
    the softmax (-inf removes a key); patch: (batch, head, query_pos, key_pos) probabilities that
    replace the computed ones where `patch_heads` (batch, head) is true."""

    bias: torch.Tensor | None = None
    patch: torch.Tensor | None = None
    patch_heads: torch.Tensor | None = None


# (site, query (batch, head, query_pos, dim), additive mask or None) -> the edit, or None
LayerEditor = Callable[[SiteKey, torch.Tensor, "torch.Tensor | None"], "LayerEdit | None"]


class _Session:
    def __init__(self, sink: LayerSink, backend: str, names: dict[int, str], causal: bool | None):
        self.sink, self.backend, self.names, self.causal = sink, backend, names, causal


class _Editing:
    def __init__(self, editor: LayerEditor, backend: str, names: dict[int, str], causal: bool | None):
        self.editor, self.backend, self.names, self.causal = editor, backend, names, causal


_ACTIVE: ContextVar["_Session | None"] = ContextVar("attnpipe_capture", default=None)
_EDITING: ContextVar["_Editing | None"] = ContextVar("attnpipe_editing", default=None)
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
    session, editing = _ACTIVE.get(), _EDITING.get()
    backend = session.backend if session is not None else editing.backend if editing is not None else "eager"
    edit = None
    if editing is not None:
        edit = editing.editor(site_key(module, editing.names, editing.causal), query, attention_mask)
    if edit is not None and edit.bias is not None:
        attention_mask = biased_mask(attention_mask, edit.bias, query, key, module)
    if edit is not None and edit.patch is not None:
        output, probs = _patched_attention(module, query, key, value, attention_mask, edit, **kwargs)
    elif backend == "eager" or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
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


def biased_mask(mask: torch.Tensor | None, bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                module: torch.nn.Module) -> torch.Tensor:
    """The additive mask plus an edit's bias: (batch, head, query_pos, key_pos). A missing mask
    (no padding) is spelled out first, causal when the module is, so the sum keeps causality.
    An edit never leaves a query without keys (its softmax would be 0/0): a row whose every key
    the edit removed keeps the unedited mask."""
    q, k = query.shape[2], key.shape[2]
    if mask is None:
        mask = torch.zeros(1, 1, q, k, device=query.device, dtype=query.dtype)
        if getattr(module, "is_causal", False) and q > 1:
            mask = mask.masked_fill(torch.ones(q, k, dtype=torch.bool, device=query.device).triu(k - q + 1),
                                    torch.finfo(query.dtype).min)
    mask, bias = mask[..., :k], bias[..., :k]  # some models hand a mask wider than the keys
    low = torch.finfo(mask.dtype).min
    edited = (mask + bias.to(mask.dtype)).clamp_(min=low)  # -inf + min stays finite
    lost = (edited <= low).all(-1, keepdim=True) & ~(mask <= low).all(-1, keepdim=True)
    return torch.where(lost, mask, edited)


def _patched_attention(module, query, key, value, attention_mask, edit: LayerEdit, **kwargs):
    """Eager attention whose probabilities are replaced, on the chosen heads, by the edit's
    patch: softmax, replace, then probabilities x values, as the eager path computes them."""
    _, probs = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    heads = edit.patch_heads.to(probs.device)[:, :, None, None]  # (batch, head, 1, 1)
    probs = torch.where(heads, edit.patch.to(probs.dtype), probs)  # (batch, head, query_pos, key_pos)
    n_rep = query.shape[1] // value.shape[1]
    values = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value  # (batch, head, key_pos, dim)
    output = torch.matmul(probs.to(value.dtype), values).transpose(1, 2).contiguous()  # (batch, query_pos, head, dim)
    return output, probs


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
def editing(editor: LayerEditor, backend: str = "eager", model: torch.nn.Module | None = None,
            causal: bool | None = None) -> Iterator[None]:
    """Every attention call inside the block asks `editor(site, query, mask)` for a `LayerEdit`
    (pipeline/control builds them); None leaves that call as it is. `backend` computes the
    layers when no capture is active (a capture's own backend wins)."""
    token = _EDITING.set(_Editing(editor, backend, module_names(model) if model is not None else {}, causal))
    try:
        yield
    finally:
        _EDITING.reset(token)


@contextmanager
def capturing(sink: Callable[[int, torch.Tensor], None], backend: str = "eager",
              model: torch.nn.Module | None = None) -> Iterator[None]:
    """`sink(layer, probs)` for every self-attention layer: the probabilities-only view."""
    with capture_layers(lambda inputs: sink(inputs.site.layer, inputs.probs), backend, model):
        yield


__all__ = ["BACKEND", "BACKENDS", "LayerEdit", "LayerInputs", "SiteKey", "capture_layers", "capturing", "editing",
           "site_key"]
