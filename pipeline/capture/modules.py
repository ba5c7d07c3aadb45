"""Capture from plain torch modules: `nn.MultiheadAttention` (also inside `nn.TransformerEncoder`,
whose layers call it with need_weights=False or skip it for a fused kernel), and a user's own
attention modules, named by a pattern, whose weights are read from their output or an attribute.

Each site's `forward` is wrapped for the length of one model call (an instance attribute set
before the call and deleted after it), never hooked: `nn.TransformerEncoderLayer` leaves its
fused fast path as soon as any hook is attached to it or its children, which would change the
model's output. The wrapper calls the module's own forward with the same arguments and returns
its result untouched, so the model computes exactly what it computes without attnpipe.

`nn.MultiheadAttention` weights are recomputed from the module's own inputs and projection
weights, per head (what need_weights=True, average_attn_weights=False would return):
softmax(q k^T / sqrt(head_dim) + attn_mask + key_padding_mask). An encoder layer is captured as a
whole (its self_attn's input is the layer's input, or norm1 of it when norm_first), because its
fast path never calls self_attn. Every site hands the active sink a `LayerInputs` whose `given`
holds the (batch, head, query_pos, key_pos) probabilities, so every recipe works unchanged.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from . import LayerInputs, _ACTIVE, site_key
from .sites import module_names

# A weights path, parsed (pipeline/job.py parses and validates the job's text): where to start,
# "output" (what the module's forward returned) or "module" (the module, after its forward), then
# steps: an int or a str in brackets (item), or a bare str (attribute).
WeightsPath = tuple[str, tuple[tuple[str, Any], ...]]  # ("output", (("item", 1),))
MAX_ROW_ERROR = 1e-3  # a row of given weights must sum to 1 within this: else they are not probabilities


@dataclass
class Site:
    """One module whose attention is captured."""

    name: str  # qualified name in the model
    module: nn.Module
    how: str  # "mha" | "encoder_layer" | "given"
    kind: str | None = None  # "cross" when known from the model's structure; else site_key decides
    layer: int = 0  # its index within its stack, in model order (set by find_sites)
    weights: WeightsPath | None = None  # for "given"
    pattern: str = ""  # the job's pattern that named it, for messages


def matches(pattern: str, name: str) -> bool:
    """`*` stands for one part of a dotted name: blocks.*.attn matches blocks.0.attn only."""
    parts, want = name.split("."), pattern.split(".")
    return len(parts) == len(want) and all(fnmatchcase(p, w) for p, w in zip(parts, want))


def find_sites(model: nn.Module, patterns: list[tuple[str, WeightsPath]]) -> list[Site]:
    """Every attention module of the model: the job's patterns first (a pattern's module is read
    its own way even when it is an nn.MultiheadAttention), then nn.TransformerEncoderLayer, then
    any other nn.MultiheadAttention. Raises ModelError for a pattern that matches nothing."""
    named = list(model.named_modules())
    chosen: dict[int, Site] = {}
    for pattern, path in patterns:
        hits = [(n, m) for n, m in named if n and matches(pattern, n)]
        if not hits:
            raise ModelError(f"model.attention_modules: pattern {pattern!r} matches no module of "
                             f"{type(model).__name__}; its modules include {_examples(named)}")
        for n, m in hits:
            chosen.setdefault(id(m), Site(n, m, "given", weights=path, pattern=pattern))
    inside: set[int] = set()  # modules within a captured one: captured with it, not again
    for site in chosen.values():
        inside |= {id(c) for c in site.module.modules()} - {id(site.module)}
    for n, m in named:
        if id(m) in chosen or id(m) in inside:
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            chosen[id(m)] = Site(n, m, "encoder_layer")
            inside |= {id(c) for c in m.modules()} - {id(m)}
        elif isinstance(m, nn.MultiheadAttention):
            _check_mha(n, m)
            chosen[id(m)] = Site(n, m, "mha", kind="cross" if n.endswith("multihead_attn") else None)
    sites = [chosen[id(m)] for _, m in named if id(m) in chosen]  # model order
    _number(sites, module_names(model))
    return sites


def _examples(named: list[tuple[str, nn.Module]], n: int = 4) -> str:
    names = [name for name, _ in named if name]
    likely = [x for x in names if "att" in x.lower()] or names
    return ", ".join(likely[:n]) + (", ..." if len(likely) > n else "") if likely else "(none)"


def _check_mha(name: str, mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ModelError(f"module {name} (nn.MultiheadAttention) has add_bias_kv or add_zero_attn: its "
                         "weights have key positions that are no token, which attnpipe cannot store")


def _number(sites: list[Site], names: dict[int, str]) -> None:
    """Layers count from 0 within each stack and kind, in model order: names alone can repeat an
    index (stages.0.blocks.0.attn and stages.1.blocks.0.attn) or carry none."""
    seen: dict[tuple[str, str], int] = {}
    for site in sites:
        key = site_key(site.module, names, kind=site.kind, layer=0)
        site.layer = seen.get((key.stack, key.kind), 0)
        seen[(key.stack, key.kind)] = site.layer + 1


# --- the wrapper -------------------------------------------------------------------------------

@contextmanager
def wrapped(sites: list[Site], attention_mask: torch.Tensor) -> Iterator[None]:
    """Each site's forward wrapped for one model call on a batch with this (batch, pos) mask."""
    own = [vars(site.module).get("forward") for site in sites]  # a forward set on the instance itself
    for site in sites:
        site.module.forward = _wrapper(site, site.module.forward, attention_mask)
    try:
        yield
    finally:
        for site, before in zip(sites, own):
            if before is None:
                del site.module.forward  # back to the class's forward
            else:
                site.module.forward = before


def _wrapper(site: Site, forward, attention_mask: torch.Tensor):
    signature = inspect.signature(forward)

    def call(*args, **kwargs):
        output = forward(*args, **kwargs)
        session = _ACTIVE.get()
        if session is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            inputs = _site_inputs(site, bound.arguments, output, attention_mask)
            inputs.site = site_key(site.module, session.names, session.causal, kind=site.kind, layer=site.layer)
            session.sink(inputs)
        return output

    return call


def _site_inputs(site: Site, arguments: dict, output: Any, attention_mask: torch.Tensor) -> LayerInputs:
    if site.how == "encoder_layer":
        return _encoder_layer_inputs(site.module, arguments, attention_mask.shape[1])
    if site.how == "mha":
        a = arguments
        return mha_inputs(site.module, a["query"], a["key"], a["key_padding_mask"], a["attn_mask"],
                          a["is_causal"])
    return _given_inputs(site, output, attention_mask)


# --- nn.MultiheadAttention ---------------------------------------------------------------------

def mha_inputs(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
               key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
               is_causal: bool = False) -> LayerInputs:
    """q, k, the additive mask and the per-head probabilities of one nn.MultiheadAttention call."""
    if query.dim() == 2:  # unbatched (pos, embed)
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.reshape(1, -1)
    elif not mha.batch_first:  # (pos, batch, embed)
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    b, lq, ls, h = query.shape[0], query.shape[1], key.shape[1], mha.num_heads
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    bias = mha.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (bias[:e], bias[e:2 * e])
    q = F.linear(query, w_q, b_q).view(b, lq, h, mha.head_dim).transpose(1, 2)  # (B, nh, Lq, hd)
    k = F.linear(key, w_k, b_k).view(b, ls, h, mha.head_dim).transpose(1, 2)  # (B, nh, Ls, hd)
    mask = additive_mask(attn_mask, key_padding_mask, is_causal, b, h, lq, ls, q.device)
    scaling = mha.head_dim ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scaling)  # (B, nh, Lq, Ls)
    if mask is not None:
        scores += mask
    return LayerInputs(site=None, query=q, key=k, scaling=scaling, mask=mask, position_bias=None, n_rep=1,
                       causal=bool(is_causal), sliding_window=None, given=torch.softmax(scores, dim=-1))


def additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
                  b: int, h: int, lq: int, ls: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1 or nh, Lq, Ls) float32: 0 where allowed, the float32 minimum where not. torch's masks:
    bool True = not allowed, or float added to the scores; attn_mask (Lq, Ls) or (B*nh, Lq, Ls),
    key_padding_mask (B, Ls). Clamped so a -inf mask still gives exact zeros and no NaN."""
    lowest = torch.finfo(torch.float32).min
    parts = []
    if attn_mask is not None:
        parts.append(_as_additive(attn_mask).reshape(-1, h if attn_mask.dim() == 3 else 1, lq, ls))
    elif is_causal:
        parts.append(torch.ones(lq, ls, dtype=torch.bool, device=device).triu(1)
                     .float().mul_(lowest).reshape(1, 1, lq, ls))
    if key_padding_mask is not None:
        parts.append(_as_additive(key_padding_mask).reshape(b, 1, 1, ls))
    if not parts:
        return None
    mask = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return mask.clamp_min(lowest)


def _as_additive(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, torch.finfo(torch.float32).min)
    return mask.float()


def _encoder_layer_inputs(layer: nn.TransformerEncoderLayer, arguments: dict, width: int) -> LayerInputs:
    """What the layer's self_attn sees: its input (norm1 of it when norm_first). In torch's fast
    path the input is a nested tensor (padding dropped); padded back to the batch's width."""
    src, padding = arguments["src"], arguments["src_key_padding_mask"]
    if src.is_nested:  # batch_first, as nested tensors always are
        lengths = torch.tensor([t.shape[0] for t in src.unbind()], device=src.device)
        src = torch.nested.to_padded_tensor(src, 0.0, (lengths.numel(), width, src.size(-1)))
        padding = torch.arange(width, device=src.device)[None, :] >= lengths[:, None]
    x = layer.norm1(src) if layer.norm_first else src
    return mha_inputs(layer.self_attn, x, x, padding, arguments["src_mask"], arguments["is_causal"])


# --- a user's module that forms its own weights ------------------------------------------------

def read_path(site: Site, output: Any) -> Any:
    """The object at the site's weights path, or ModelError naming the step that is missing."""
    root, steps = site.weights
    value = output if root == "output" else site.module
    for kind, step in steps:
        try:
            value = value[step] if kind == "item" else getattr(value, step)
        except (IndexError, KeyError, TypeError, AttributeError):
            raise ModelError(f"module {site.name} ({type(site.module).__name__}): weights {format_path(site.weights)!r} "
                             f"(model.attention_modules {site.pattern!r}) cannot be read: "
                             f"{type(value).__name__} has no {step!r}") from None
    return value


def format_path(path: WeightsPath) -> str:
    root, steps = path
    return root + "".join(f"[{s!r}]" if k == "item" and isinstance(s, str) else f"[{s}]" if k == "item"
                          else f".{s}" for k, s in steps)


def _given_inputs(site: Site, output: Any, attention_mask: torch.Tensor) -> LayerInputs:
    """The module's own weights, checked: (batch, head, query_pos, key_pos) or one head
    (batch, query_pos, key_pos), probabilities over keys, none on padding keys."""
    weights = read_path(site, output)
    where = (f"module {site.name} ({type(site.module).__name__}): weights {format_path(site.weights)!r} "
             f"(model.attention_modules {site.pattern!r})")
    if not isinstance(weights, torch.Tensor):
        never = " (the module did not form them; e.g. need_weights=False)" if weights is None else ""
        raise ModelError(f"{where} is {type(weights).__name__}{never}, not a tensor of attention weights")
    if weights.dim() == 3:
        weights = weights.unsqueeze(1)
    batch, width = attention_mask.shape
    if weights.dim() != 4 or weights.shape[0] != batch or weights.shape[2] != width \
            or not weights.is_floating_point():
        raise ModelError(f"{where} has shape {tuple(weights.shape)} ({weights.dtype}); expected floats shaped "
                         f"(batch={batch}, head, query_pos={width}, key_pos) or (batch, query_pos, key_pos)")
    probs = _checked(weights.detach().float(), attention_mask.bool(), where)
    return LayerInputs(site=None, query=probs.new_empty(*probs.shape[:3], 0),
                       key=probs.new_empty(*probs.shape[:2], probs.shape[-1], 0), scaling=1.0, mask=None,
                       position_bias=None, n_rep=1, causal=False, sliding_window=None, given=probs)


def _checked(probs: torch.Tensor, valid: torch.Tensor, where: str) -> torch.Tensor:
    """Rows of real queries sum to 1 and, when the keys are the batch's tokens, give padding no
    weight; padding entries then exactly 0 (the recipes rely on it, as they do for the model's
    own softmax over a masked score). valid: (batch, pos) bool, pos = query_pos."""
    rows = probs.sum(-1)[valid[:, None, :].expand(-1, probs.shape[1], -1)]  # real queries only
    worst = (rows - 1).abs().max().item() if rows.numel() else 0.0
    if not worst <= MAX_ROW_ERROR:
        raise ModelError(f"{where}: its rows sum to {1 + worst:.4g}, not 1; give the probabilities "
                         "after the softmax, not the scores")
    if probs.shape[-1] != valid.shape[1]:  # keys of another sequence: their padding is not known here
        return probs
    on_padding = probs.masked_fill(valid[:, None, None, :] | ~valid[:, None, :, None], 0.0)
    if on_padding.max().item() > MAX_ROW_ERROR:
        raise ModelError(f"{where}: puts weight {on_padding.max().item():.3g} on padding tokens; the module "
                         "must mask keys where attention_mask is 0")
    # NaN in a padded query's row (a module that masks queries too) would reach the head means.
    return torch.nan_to_num(probs.masked_fill(~valid[:, None, None, :], 0.0), nan=0.0)
