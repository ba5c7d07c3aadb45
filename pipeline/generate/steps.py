"""What one decoding step writes: every layer's single query row reduced at once.

A step's forward hands each layer's probabilities for the one new query, (batch, head, 1, keys),
over the left-padded key positions of the KV cache. They are stacked across layers into
(layer, batch, head, keys) and reduced in a few vectorised passes: the grounding features, the
per-step head statistics and the edge recipes (topk, threshold, topp). Rollout, dense maps and
word-level recipes run on the prompt only (they need whole maps).

Positions written are the document's own: key index minus the row's left padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..recipes.attention import HEAD_MEAN

_TINY = torch.finfo(torch.float32).tiny
STEP_RECIPES = ("topk", "threshold", "topp", "head_stats")


@dataclass
class KeyFacts:
    """Per batch row and key index of the padded cache (batch, keys): what each key is."""

    pad: torch.Tensor  # (batch,) left padding of each row
    real: torch.Tensor  # (batch, keys) bool: not padding
    context: torch.Tensor  # (batch, keys) bool: the context segment (or the whole prompt without one)
    prompt: torch.Tensor  # (batch, keys) bool: any prompt token
    special: torch.Tensor  # (batch, keys) bool
    sep: torch.Tensor
    punct: torch.Tensor
    prompt_length: torch.Tensor  # (batch,) real prompt tokens

    def grown(self, keys: int) -> "KeyFacts":
        """The facts for `keys` keys: positions past the prompt are generated tokens, real."""
        extra = keys - self.real.shape[1]
        if extra <= 0:
            return self if extra == 0 else self._cut(keys)
        pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], dim=1)  # noqa: E731
        return KeyFacts(self.pad, pad(self.real, True), pad(self.context, False), pad(self.prompt, False),
                        pad(self.special, False), pad(self.sep, False), pad(self.punct, False), self.prompt_length)

    def _cut(self, keys: int) -> "KeyFacts":
        c = lambda t: t[:, :keys]  # noqa: E731
        return KeyFacts(self.pad, c(self.real), c(self.context), c(self.prompt), c(self.special), c(self.sep),
                        c(self.punct), self.prompt_length)


def grounding(p: torch.Tensor, facts: KeyFacts, step: int) -> dict[str, torch.Tensor]:
    """(layer, batch, head) features of the step's query rows `p` (layer, batch, head, keys), the
    query being the last key. Means, not sums, in the ratio (Lookback Lens)."""
    f = facts.grown(p.shape[-1])
    ctx, prompt = f.context.float(), f.prompt.float()
    generated = (f.real & ~f.prompt).float()
    n_ctx = ctx.sum(-1).clamp_min(1.0)  # (batch,)
    context_mass = torch.einsum("lbhk,bk->lbh", p, ctx)
    prompt_mass = torch.einsum("lbhk,bk->lbh", p, prompt) - context_mass
    generated_mass = torch.einsum("lbhk,bk->lbh", p, generated)
    context_mean = context_mass / n_ctx[None, :, None]
    generated_mean = generated_mass / step if step else torch.zeros_like(generated_mass)
    ratio = context_mean / (context_mean + generated_mean)  # NaN only when both are 0
    entropy = -(p * torch.clamp_min(p, _TINY).log()).sum(-1)
    prev = p[..., -2] if p.shape[-1] > 1 else torch.zeros_like(p[..., -1])
    return {"lookback_ratio": ratio, "context_mass": context_mass, "context_mean": context_mean,
            "prompt_mass": prompt_mass.clamp_min(0.0), "generated_mass": generated_mass,
            "generated_mean": generated_mean, "self_mass": p[..., -1], "prev_mass": prev, "entropy": entropy,
            "keys": f.real.sum(-1).to(torch.int32)}


def head_stats(p: torch.Tensor, facts: KeyFacts) -> dict[str, torch.Tensor]:
    """(layer, batch, head) statistics of one query row each, as head_stats computes them over a
    window's queries (pipeline/recipes/head_stats.py): the query is the last key, nothing follows it."""
    f = facts.grown(p.shape[-1])
    keys = f.real.sum(-1).float()  # (batch,)
    entropy = -(p * torch.clamp_min(p, _TINY).log()).sum(-1)
    log_n = torch.where(keys > 1, keys.clamp_min(2).log(), torch.full_like(keys, math.inf))
    index = torch.arange(p.shape[-1], device=p.device)
    first = (index[None, :] == f.pad[:, None]).float()
    distance = ((p.shape[-1] - 1) - index).float()  # from the query, the last key
    mass = lambda m: torch.einsum("lbhk,bk->lbh", p, m.float())  # noqa: E731
    prev = p[..., -2] if p.shape[-1] > 1 else torch.zeros_like(p[..., -1])
    return {"window_tokens": keys.to(torch.int32), "entropy": entropy, "entropy_norm": entropy / log_n[None, :, None],
            "first_mass": mass(first), "sep_mass": mass(f.sep), "special_mass": mass(f.special),
            "self_mass": p[..., -1], "prev_mass": prev, "next_mass": torch.zeros_like(entropy),
            "punct_mass": mass(f.punct), "mean_distance": torch.einsum("lbhk,k->lbh", p, distance)}


def edges(p: torch.Tensor, facts: KeyFacts, name: str, params: dict) -> dict[str, torch.Tensor]:
    """Rows of the edge recipe `name` on the step's query rows: (layer, batch_index, head, key_pos,
    weight) with key positions in document coordinates."""
    f = facts.grown(p.shape[-1])
    per_head = params["per_head"]
    probs = p if per_head else p.mean(dim=2, keepdim=True)  # (layer, batch, head or 1, keys)
    real = f.real[None, :, None, :]
    if name == "topk":
        scores = probs.masked_fill(~real, float("-inf"))
        weight, key = scores.topk(min(params["k"], scores.shape[-1]), dim=-1)
        keep = weight != float("-inf")
    elif name == "threshold":
        keep, key, weight = (probs > params["t"]) & real, None, probs
    else:  # topp
        weight, key = probs.masked_fill(~real, -1.0).sort(dim=-1, descending=True, stable=True)
        weight = weight.clamp_min(0.0)
        keep = ((weight.cumsum(-1) - weight) < params["p"]) & (weight > 0)
    layer, row, head, j = keep.nonzero(as_tuple=True)
    key_index = j if key is None else key[layer, row, head, j]
    return {"layer": layer, "batch_index": row, "head": head if per_head else torch.full_like(head, HEAD_MEAN),
            "key_pos": key_index - f.pad[row], "weight": weight[layer, row, head, j].float()}


def flatten(values: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """(layer, batch, head) tensors -> 1-D columns with layer, batch_index and head, for the
    batch rows in `rows` only (those still generating)."""
    first = next(v for v in values.values() if v.dim() == 3)
    layers, _, heads = first.shape
    sel = {k: (v if v.dim() == 3 else v[None, :, None].expand(layers, -1, heads))[:, rows] for k, v in values.items()}
    n = len(rows)
    grid = torch.meshgrid(torch.arange(layers), rows.cpu(), torch.arange(heads), indexing="ij")
    cols = {"layer": grid[0].reshape(-1), "batch_index": grid[1].reshape(-1), "head": grid[2].reshape(-1)}
    cols.update({k: v.reshape(-1) for k, v in sel.items()})
    assert cols["layer"].numel() == layers * n * heads
    return cols
