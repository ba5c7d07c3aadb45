"""Attention capture without `output_attentions=True`.

We register an attention function named "attnpipe" in transformers' AttentionInterface. Each
attention module calls it once per forward pass; it runs the model's own eager attention (so the
probabilities are bit-identical to HF eager), hands the probabilities to the active sink
(the recipes), and returns no weights, so no layer's map outlives its own layer.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .errors import ModelError

BACKEND = "attnpipe"
# (layer, probs (batch, head, query_pos, key_pos)) -> None
LayerSink = Callable[[int, torch.Tensor], None]

_ACTIVE: ContextVar["_Counter | None"] = ContextVar("attnpipe_capture", default=None)
_EAGER: dict[type, Callable] = {}


class _Counter:
    """Numbers layers in call order: attention modules run bottom-up in a forward pass."""

    def __init__(self, sink: LayerSink):
        self.sink, self.layers = sink, 0

    def __call__(self, probs: torch.Tensor) -> None:
        self.sink(self.layers, probs)
        self.layers += 1


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
    """Drop-in attention function: eager math, probabilities to the sink, none returned."""
    output, probs = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    counter = _ACTIVE.get()
    if counter is not None:
        counter(probs)
    return output, None


AttentionInterface.register(BACKEND, attnpipe_attention)
AttentionMaskInterface.register(BACKEND, eager_mask)  # eager's additive float mask


@contextmanager
def capturing(sink: LayerSink) -> Iterator[_Counter]:
    """Route every attention call inside the block to `sink(layer, probs)`."""
    token = _ACTIVE.set(_Counter(sink))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)
