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
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..errors import ModelError
from .sites import SiteKey, module_names, site_key

BACKEND = "attnpipe"
BACKENDS = ("eager", "sdpa")


@dataclass
class LayerInputs:
    """What one attention call hands the recipes. Shapes: query (batch, head, query_pos, dim),
    key (batch, kv_head, key_pos, dim), mask (batch, 1 or head, query_pos, key_pos): additive
    (eager's float mask), boolean (SDPA's, true = attend), or None, in which case `implied_causal`
    says whether the backend masked the future itself (SDPA's is_causal)."""

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
    implied_causal: bool = False  # mask is None and the backend ran causal attention without one
    # The layer's values (batch, kv_head, key_pos, dim) when the capture computes the layer's
    # output from the probabilities the recipes form (capture_layers(outputs=True)): every
    # block of probabilities computed from the scores also gives its rows of `output`.
    value: torch.Tensor | None = field(default=None, repr=False)
    output: torch.Tensor | None = field(default=None, repr=False)  # (batch, query_pos, head, dim)
    _covered: torch.Tensor | None = field(default=None, repr=False)  # (batch, query_pos) rows written

    @property
    def output_complete(self) -> bool:
        """Every row of the layer's output came from the probabilities the recipes formed."""
        return self._covered is not None and bool(self._covered.all())

    def _emit(self, lo: int, hi: int, q0: int, probs: torch.Tensor) -> None:
        """Rows lo..hi, q0.. of the layer's output from their probabilities: P V, as eager
        attention computes it (the probabilities in the values' dtype), grouped-query heads
        reading their key/value head without a copy of it."""
        if self.value is None:
            return
        batch, heads, rows, keys = probs.shape
        value = self.value[lo:hi, :, :keys]
        self._output_buffer()
        weights = probs if probs.dtype == value.dtype else probs.to(value.dtype)
        out = torch.matmul(weights.reshape(batch, value.shape[1], self.n_rep * rows, keys), value)
        self.output[lo:hi, q0: q0 + rows] = out.view(batch, heads, rows, -1).transpose(1, 2)
        self._covered[lo:hi, q0: q0 + rows] = True

    def _output_buffer(self) -> None:
        if self.output is None:
            b, heads, q, _ = self.query.shape
            value = self.value
            self.output = torch.empty((b, q, heads, value.shape[-1]), dtype=value.dtype, device=value.device)
            self._covered = torch.zeros((b, q), dtype=torch.bool, device=value.device)

    @cached_property
    def kernel_masking(self) -> tuple[torch.Tensor, bool] | None:
        """(each window's length (batch,) int64, causal) when the compiled CPU kernel
        (kernels/cpu.py) can take this layer: float32 on the CPU, self-attention over the same
        positions, no position bias or sliding window, probabilities not already given by the
        backend, and a mask that masks right padding (and, causal, the future) or nothing.
        None otherwise: the torch ops then compute the same."""
        query, key = self.query, self.key
        if (self.given is not None or self.position_bias is not None or self.sliding_window is not None
                or query.device.type != "cpu" or query.shape[2] != key.shape[2] or query.shape[1] % key.shape[1]
                or any(t.dtype != torch.float32 for t in (query, key, self.value) if t is not None)):
            return None
        batch, keys = query.shape[0], key.shape[2]
        if self.mask is None:
            return torch.full((batch,), keys, dtype=torch.int64), self.implied_causal and keys > 1
        if self._padding is None:
            return None
        bias, causal = self._padding
        valid = bias == 0  # (batch or 1, key_pos)
        lengths = valid.sum(-1)
        if not torch.equal(valid, torch.arange(keys)[None, :] < lengths[:, None]):  # not right padding
            return None
        return lengths.expand(batch).contiguous(), causal

    def compiled_rows(self, lo: int, hi: int, q0: int = 0, q1: int | None = None, k1: int | None = None, *,
                      flags: torch.Tensor | None = None, output: bool = True, **asked) -> dict[str, torch.Tensor]:
        """Windows lo..hi, query rows q0..q1 and keys 0..k1 through the compiled CPU kernel (this
        layer's `kernel_masking` must not be None): what `kernels.cpu.attention_rows` returns for
        `asked` (stats, mean, probs, topk_head, topk_mean), and, with `output` and the values at
        hand, those rows of the layer's output (P V)."""
        from ..kernels import cpu

        q1 = self.query.shape[2] if q1 is None else min(q1, self.query.shape[2])
        k1 = self.key.shape[2] if k1 is None else min(k1, self.key.shape[2])
        lengths, causal = self.kernel_masking
        value = out = None
        if output and self.value is not None:
            self._output_buffer()
            value, out = self.value[lo:hi, :, :k1], self.output[lo:hi, q0:q1]
        result = cpu.attention_rows(self.query[lo:hi, :, q0:q1], self.key[lo:hi, :, :k1], value, lengths[lo:hi],
                                    causal=causal, offset=q0, scaling=self.scaling, flags=flags, out=out, **asked)
        if out is not None:
            self._covered[lo:hi, q0:q1] = True
        return result

    @cached_property
    def probs(self) -> torch.Tensor:
        """(batch, head, query_pos, key_pos) float32: softmax(q k^T * scaling + bias + mask),
        computed at most once per layer."""
        if self.given is not None:
            return self.given
        return self.probs_rows(0, self.query.shape[0])

    def additive(self, lo: int = 0, hi: int | None = None, q0: int = 0, q1: int | None = None,
                 k1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The mask of windows lo..hi, query rows q0..q1 and keys 0..k1 as an additive float mask
        (0 or the dtype's minimum), whatever form the backend took it in; None when nothing is
        masked."""
        hi = self.query.shape[0] if hi is None else hi
        q1 = self.query.shape[2] if q1 is None else min(q1, self.query.shape[2])
        k1 = self.key.shape[2] if k1 is None else min(k1, self.key.shape[2])
        mask = self.mask
        if mask is None:
            if not self.implied_causal:
                return None
            # the query rows are the last ones of the keys (lower right)
            rows = torch.arange(q0, q1, device=self.query.device) + (self.key.shape[2] - self.query.shape[2])
            future = torch.arange(k1, device=self.query.device)[None, :] > rows[:, None]
            if not future.any():
                return None
            return torch.zeros(future.shape, dtype=dtype, device=future.device).masked_fill_(
                future, torch.finfo(dtype).min)[None, None]
        mask = (mask if mask.shape[0] == 1 else mask[lo:hi])[..., q0:q1, :k1]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask.to(dtype)

    def probs_rows(self, lo: int, hi: int, q0: int = 0, q1: int | None = None, k1: int | None = None) -> torch.Tensor:
        """The probabilities of windows lo..hi (and query rows q0..q1, keys 0..k1) only: a view
        when the backend computed them, else computed from those rows' q and k (a few windows, or
        a block of one long window's queries, at a time: they stay in cache on a CPU, and a long
        window never needs its whole (head, T, T) map). Keys past k1 must have no weight (a
        causal block's future): the softmax is over keys 0..k1."""
        if self.given is not None:
            return self.given[lo:hi, :, q0:q1, :k1]
        probs = torch.softmax(self.scores_rows(lo, hi, q0, q1, k1), dim=-1)
        self._emit(lo, hi, q0, probs)
        return probs

    def probs_entropy_rows(self, lo: int, hi: int, q0: int = 0, q1: int | None = None,
                           k1: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities of the same rows as probs_rows, each query's entropy in nats (windows,
        head, queries)), from the scores, with no exp() or log of the weights: exp() of the masked
        scores (the float32 minimum), or of anything under -87, takes CPUs' slow underflow path
        (8.6 against 1.4 ms for 10 x 12 x 128 x 128), which torch's softmax avoids.

        Rows of 48 keys or more: with m the row's top score and Z = sum exp(s - m),
        H = log Z - sum p (s - m), where log Z = -log max p (the top key's weight is exp(0) / Z);
        both terms are >= 0, so nothing cancels. Shorter rows: H = -sum p log_softmax(s), as a
        reduction over a short row costs nearly as much as the softmax (two reductions fewer:
        4.8 against 8.0 ms for 239 x 12 x 27 x 27, 1.4 against 2.5 the other way at 128 keys)."""
        scores = self.scores_rows(lo, hi, q0, q1, k1)
        probs = torch.softmax(scores, dim=-1)
        self._emit(lo, hi, q0, probs)
        if scores.shape[-1] < 48:
            return probs, torch.log_softmax(scores, dim=-1).mul_(probs).sum(dim=-1).neg_()
        scores -= scores.amax(dim=-1, keepdim=True)  # s - m <= 0; masked keys stay finite, their p is 0
        spread = scores.mul_(probs).sum(dim=-1)  # sum p (s - m) <= 0
        return probs, probs.amax(dim=-1).log_().neg_().sub_(spread)

    def scores_rows(self, lo: int, hi: int, q0: int = 0, q1: int | None = None, k1: int | None = None) -> torch.Tensor:
        """(windows, head, q1 - q0, k1) float32 scores before the softmax: q k^T * scaling +
        position bias + mask."""
        q1 = self.query.shape[2] if q1 is None else min(q1, self.query.shape[2])
        k1 = self.key.shape[2] if k1 is None else min(k1, self.key.shape[2])
        query, key = self.query[lo:hi, :, q0:q1], self.key[lo:hi, :, :k1]
        batch, heads, rows, dim = query.shape
        padding = self._padding
        # One contiguous float32 copy of each operand (the product needs them contiguous anyway),
        # the query scaled on the way. Key padding (the usual SDPA mask: padded keys, and
        # causality or not) goes in as one more dimension, 1 on the query side and 0 or the
        # float32 minimum on the key side, so the product itself masks: a masked_fill of the
        # scores, broadcast over heads and queries, cost more than the product (1.7 against
        # 2.0 ms for 10 x 12 x 128 x 128; 3x on 27-token windows).
        width = dim + (padding is not None)
        q = torch.empty((batch, heads, rows, width), dtype=torch.float32, device=query.device)
        torch.mul(query if query.dtype == torch.float32 else query.float(), self.scaling, out=q[..., :dim])
        k = torch.empty((batch, key.shape[1], key.shape[2], width), dtype=torch.float32, device=key.device)
        k[..., :dim] = key
        if padding is not None:
            bias, causal = padding
            q[..., dim] = 1.0
            k[..., dim] = (bias if bias.shape[0] == 1 else bias[lo:hi])[:, None, :k1]
        # Grouped-query attention: query head i reads key/value head i // n_rep, so each key/value
        # head's queries go in one product, with no copy of the keys per query head.
        scores = torch.matmul(q.view(batch, key.shape[1], self.n_rep * rows, width), k.transpose(-1, -2))
        scores = scores.view(batch, heads, rows, -1)
        if self.position_bias is not None:
            bias = self.position_bias
            scores += (bias if bias.shape[0] == 1 else bias[lo:hi])[..., q0:q1, :k1].float()
        if padding is not None:
            return self._mask_future(scores, q0, k1) if causal else scores
        if self.mask is None and self.implied_causal:
            return self._mask_future(scores, q0, k1)
        if self.mask is not None and self.mask.dtype == torch.bool:  # SDPA's: fill, no float mask
            masked = self._masked
            masked = masked if masked.shape[0] == 1 else masked[lo:hi]
            scores.masked_fill_(masked[..., q0:q1, :k1] if masked.shape[2] > 1 else masked[..., :k1],
                                torch.finfo(scores.dtype).min)
            return scores
        mask = self.additive(lo, hi, q0, q1, k1)
        if mask is not None:
            scores += mask
        return scores

    def _mask_future(self, scores: torch.Tensor, q0: int, k1: int) -> torch.Tensor:
        """Causality (query rows last among the keys, lower right) on the scores of queries
        q0.. and keys 0..k1: only the keys after the block's first query can be in the future,
        so the fill touches that corner of the scores only."""
        first = q0 + self.key.shape[2] - self.query.shape[2]  # the first query's own key
        corner = scores[..., first + 1: k1]
        if corner.shape[-1]:
            rows = torch.arange(first, first + scores.shape[-2], device=scores.device)[:, None]
            future = torch.arange(first + 1, k1, device=scores.device)[None, :] > rows
            corner.masked_fill_(future, torch.finfo(scores.dtype).min)
        return scores

    @cached_property
    def _padding(self) -> tuple[torch.Tensor, bool] | None:
        """(additive (batch or 1, key_pos) float32: 0 or the float32 minimum, causal) when the
        boolean mask masks padded keys only, the same for every query, or those and the future
        (lower right): SDPA's mask of a padded batch, for an encoder and a decoder. None for any
        other mask (sliding windows, a query-side mask, a float mask), which scores_rows then
        applies as it is."""
        mask = self.mask
        rows, keys = self.query.shape[2], self.key.shape[2]
        if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 \
                or mask.shape[2] not in (1, rows) or mask.shape[3] < keys:
            return None
        mask = mask[..., :keys]
        seen = mask[:, 0, -1, :]  # (batch, key_pos): the last query sees every key any query does
        step = max(1, (16 << 20) // max(1, mask.shape[0] * keys))  # rows compared at a time: ~16 MB
        causal = None
        for r0 in range(0, mask.shape[2], step):
            part = mask[:, 0, r0: r0 + step]
            expected = seen[:, None, :].expand_as(part)
            if causal is None:
                causal = not torch.equal(part, expected)
            if causal:
                index = torch.arange(r0, r0 + part.shape[1], device=mask.device) + (keys - rows)
                expected = expected & (torch.arange(keys, device=mask.device)[None, :] <= index[:, None])
            if not torch.equal(part, expected):
                return None
        bias = torch.zeros(seen.shape, dtype=torch.float32, device=seen.device)
        return bias.masked_fill_(~seen, torch.finfo(torch.float32).min), bool(causal) and rows > 1

    @cached_property
    def _masked(self) -> torch.Tensor:
        """Where the boolean mask masks, without its broadcast dimensions spelled out (SDPA's
        padding mask of an encoder is (batch, 1, 1, key_pos) expanded over the queries)."""
        mask = self.mask[..., : self.key.shape[2]]
        index = tuple(slice(0, 1) if mask.stride(d) == 0 and mask.shape[d] > 1 else slice(None) for d in range(4))
        return ~mask[index]


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
    def __init__(self, sink: LayerSink, backend: str, names: dict[int, str], causal: bool | None,
                 outputs: bool = False):
        self.sink, self.backend, self.names, self.causal = sink, backend, names, causal
        self.outputs = outputs


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
    # SDPA's rule: no mask and more than one query means causal attention, for a causal module.
    implied = attention_mask is None and query.shape[2] > 1 and bool(
        kwargs["is_causal"] if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True))
    # soft-capping and attention sinks: only the layer's own eager attention has them
    own_eager = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if session is not None and session.outputs and backend == "sdpa" and edit is None and not module.training \
            and not kwargs.get("dropout") and not own_eager:
        # The recipes form every row's probabilities anyway: the layer's output comes from them
        # (P V), so no second softmax(q k^T) runs in SDPA. Rows no recipe formed (a site the sink
        # skips) fall back to SDPA.
        inputs = _inputs(session, module, query, key, attention_mask, kwargs, None, implied)
        inputs.value = value
        session.sink(inputs)
        if inputs.output_complete:
            return inputs.output, None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0], None
    if edit is not None and edit.patch is not None:
        output, probs = _patched_attention(module, query, key, value, attention_mask, edit, **kwargs)
    elif backend == "eager" or own_eager:
        if backend != "eager" and (implied or (attention_mask is not None and attention_mask.dtype == torch.bool)):
            attention_mask = LayerInputs(None, query, key, 1.0, attention_mask, None, 1, False, None,
                                         implied_causal=implied).additive(dtype=query.dtype)  # SDPA's form
            implied = False
        output, probs = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    else:
        output, probs = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if session is not None:
        session.sink(_inputs(session, module, query, key, attention_mask, kwargs, probs, implied and probs is None))
    return output, None


def _inputs(session: _Session, module, query, key, mask, kwargs, probs, implied: bool) -> LayerInputs:
    scaling = kwargs.get("scaling")
    return LayerInputs(
        site=site_key(module, session.names, session.causal), query=query, key=key,
        scaling=query.shape[-1] ** -0.5 if scaling is None else float(scaling), mask=mask,
        position_bias=kwargs.get("position_bias"), n_rep=query.shape[1] // key.shape[1],
        causal=bool(getattr(module, "is_causal", False)), sliding_window=kwargs.get("sliding_window"),
        given=probs, implied_causal=implied)


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


def attnpipe_mask(*args, **kwargs) -> torch.Tensor | None:
    """The model's attention mask, in the form its backend takes. SDPA's (a capture on the sdpa
    backend, no edit): None where causality or nothing needs masking (no padding, as SDPA itself
    decides), else a boolean (batch, 1, query_pos, key_pos), so no float (T, T) mask is formed for
    a long window. Otherwise eager's additive float mask, which edits add their bias to."""
    session = _ACTIVE.get()
    if session is not None and session.backend == "sdpa" and _EDITING.get() is None:
        return sdpa_mask(*args, **kwargs)
    return eager_mask(*args, **kwargs)


AttentionInterface.register(BACKEND, attnpipe_attention)
AttentionMaskInterface.register(BACKEND, attnpipe_mask)


@contextmanager
def capture_layers(sink: LayerSink, backend: str = "eager", model: torch.nn.Module | None = None,
                   causal: bool | None = None, outputs: bool = False) -> Iterator[None]:
    """Route every attention call inside the block to `sink(LayerInputs)`; `model` names the
    modules for site keys (layer indices from the modules themselves otherwise). With `outputs`
    (the sdpa backend), the layers' outputs come from the probabilities the sink forms, P V, and
    SDPA runs only for rows it formed none of: the CPU path, where SDPA cost as much again."""
    token = _ACTIVE.set(_Session(sink, backend, module_names(model) if model is not None else {}, causal, outputs))
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
