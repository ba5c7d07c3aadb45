"""The gradient driver: a batch through the model with autograd on, beside the inference-mode
forward of pipeline/reduce.py, for recipes that need dF/dA (pipeline/recipes/saliency.py).

Attention runs through "attnpipe_grad", an attention function of our own registered in
transformers' AttentionInterface and switched on around the gradient pass only: eager attention
(softmax in float32) whose probabilities A (batch, head, query_pos, key_pos) stay in the autograd
graph, kept per site (pipeline/capture/sites.py's key), or replaced by a given tensor for
integrated gradients. dF/dA comes from one `torch.autograd.grad` over every layer's A, F summed
over windows (windows never see each other, so each window gets its own gradient).

Memory: the batch is cut into slices of a few windows (GRAD_SLICE_BYTES of one layer's
probabilities each) and one slice's graph lives at a time; the model's parameters are frozen
during the pass, so the graph keeps only what dF/dA needs. No activation checkpointing: a slice
bounds the graph, and checkpointing would only trade time once a single window does not fit.
Integrated gradients recompute the forward for every step instead of storing anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .. import capture
from ..capture.sites import SiteKey, module_names, site_key
from ..errors import ModelError, RecipeError
from ..model import LoadedModel
from ..recipes import RECIPES
from ..recipes.saliency import LayerSaliency
from ..reduce import PendingBatch, SiteMasks, _merge, batch_masks, reduce_batch_async
from ..windows import Window, collate
from .scalars import SCALAR_KEYS, Scalar, ScalarFn, scalar_fn

GRAD_BACKEND = "attnpipe_grad"
GRAD_SLICE_BYTES = 16 << 20  # of one layer's float32 probabilities per slice; the graph holds a few per layer
_DRIVER_KEYS = {"name", "level", "steps", "rule", *SCALAR_KEYS}  # parameters the driver uses, not the recipe function


@dataclass
class GradSession:
    """What the attention function does inside a gradient pass: keep each site's probabilities
    (`keep`), and for `given` = (site, tensor) use that tensor as the site's probabilities."""

    names: dict[int, str]
    causal: bool | None
    keep: bool = True
    given: tuple[SiteKey, torch.Tensor] | None = None
    probs: dict[SiteKey, torch.Tensor] = field(default_factory=dict)

    def take(self, site: SiteKey, probs: torch.Tensor) -> torch.Tensor:
        if self.given is not None and site == self.given[0]:
            return self.given[1]
        if self.keep:
            if not probs.requires_grad:  # the layer's inputs need no gradient (the first layer)
                probs.requires_grad_()
            self.probs[site] = probs
        return probs


_SESSION: ContextVar["GradSession | None"] = ContextVar("attnpipe_grad", default=None)


def grad_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with its probabilities in the graph: softmax(q k^T * scaling + bias + mask)
    in float32, handed to the session, then times v. Shapes: query (batch, head, query_pos, dim),
    key/value (batch, kv_head, key_pos, dim); returns (batch, query_pos, head, dim) as HF eager."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ModelError(f"{type(module).__name__}: attention soft-capping or sinks are not supported by the "
                         "gradient recipes")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: each key/value head serves n_rep query heads
        key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (batch, head, q, k)
    if kwargs.get("position_bias") is not None:
        scores = scores + kwargs["position_bias"].float()
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].float()
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:  # no mask handed over: keep it causal
        q, k = scores.shape[-2:]
        future = torch.ones(q, k, dtype=torch.bool, device=scores.device).triu(k - q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    session = _SESSION.get()
    if session is not None:
        probs = session.take(site_key(module, session.names, session.causal), probs)
    output = torch.matmul(probs.to(value.dtype), value)  # (batch, head, query_pos, dim)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GRAD_BACKEND, grad_attention)
AttentionMaskInterface.register(GRAD_BACKEND, eager_mask)


@contextmanager
def gradient_mode(lm: LoadedModel) -> Iterator[GradSession]:
    """The model with "attnpipe_grad" attention, frozen parameters and autograd on; all restored."""
    model = lm.model
    before = model.config._attn_implementation
    frozen = [p for p in model.parameters() if p.requires_grad]
    session = GradSession(module_names(model), lm.causal)
    model.set_attn_implementation(GRAD_BACKEND)
    for p in frozen:
        p.requires_grad_(False)
    token = _SESSION.set(session)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield session
    finally:
        _SESSION.reset(token)
        for p in frozen:
            p.requires_grad_(True)
        model.set_attn_implementation(before or capture.BACKEND)


@dataclass
class Pass:
    """One scalar's result for a slice: F (batch,) and per self-attention site (A, G)."""

    scalar: torch.Tensor
    layers: dict[SiteKey, tuple[torch.Tensor, torch.Tensor]]
    baselines: dict[SiteKey, torch.Tensor] = field(default_factory=dict)  # F(0_l), integrated only


def gradient_pass(session: GradSession, fn: ScalarFn, ids: torch.Tensor, mask: torch.Tensor) -> Pass:
    """F and dF/dA for every self-attention layer, from one forward and one backward pass."""
    session.probs, session.keep, session.given = {}, True, None
    value = fn(ids, mask)  # (batch,)
    sites = [s for s in sorted(session.probs, key=lambda s: (s.stack, s.layer)) if s.kind == "self"]
    if not sites:
        raise ModelError("no attention layer called the attnpipe_grad attention function; this model's "
                         "attention is not supported by the gradient recipes")
    grads = torch.autograd.grad(value.sum(), [session.probs[s] for s in sites], allow_unused=True)
    layers = {s: (session.probs[s].detach().float(), torch.zeros_like(session.probs[s]) if g is None else g.float())
              for s, g in zip(sites, grads)}
    session.probs = {}
    return Pass(value.detach(), layers)


def integrated_pass(session: GradSession, fn: ScalarFn, ids: torch.Tensor, mask: torch.Tensor,
                    plain: Pass, steps: int, rule: str = "right") -> Pass:
    """Hao et al.'s integrated gradients: per layer l, the mean over alpha = 1/m, ..., m/m (rule
    "right"; "midpoint": alpha = (j - 1/2)/m) of dF/dA_l with only layer l's probabilities
    replaced by alpha * A_l; and F(0_l)."""
    shift = 0.5 if rule == "midpoint" else 0.0
    session.keep = False
    layers, baselines = {}, {}
    for site, (probs, _) in plain.layers.items():
        total = torch.zeros_like(probs)
        for j in range(1, steps + 1):
            scaled = (probs * ((j - shift) / steps)).requires_grad_()
            session.given = (site, scaled)
            total += torch.autograd.grad(fn(ids, mask).sum(), scaled)[0]
        session.given = (site, torch.zeros_like(probs))
        with torch.no_grad():
            baselines[site] = fn(ids, mask).detach()
        layers[site] = (probs, total / steps)
    session.given, session.keep = None, True
    return Pass(plain.scalar, layers, baselines)


def grad_slices(lm: LoadedModel, windows: int, size: int) -> list[tuple[int, int]]:
    """Ranges of the batch's windows whose graph is built one at a time (GRAD_SLICE_BYTES)."""
    step = max(1, GRAD_SLICE_BYTES // (lm.num_heads * size * size * 4))
    return [(lo, min(lo + step, windows)) for lo in range(0, windows, step)]


def _pass_key(spec: dict) -> tuple:
    """Recipes with the same key share their passes: the scalar, and the steps and rule of
    integrated ones."""
    integrated = spec["name"] in ("attn_ig", "attn_ig_heads")
    return (Scalar.of(spec), (spec["steps"], spec["rule"]) if integrated else None)


def reduce_batch_grad(lm: LoadedModel, windows: list[Window], recipes: list[dict],
                      keep: dict | None = None) -> PendingBatch:
    """The batch's outputs for every recipe: the other recipes through the inference-mode
    reduce (which also keeps the clean pass for interventions when `keep` is given), the
    gradient recipes through gradient passes here; one PendingBatch of both."""
    if windows[0].target is not None:
        raise RecipeError("gradient recipes (attn_grad, attn_ig, grad_rollout, ...) do not support source/target "
                          "pairs yet; drop corpus.target_column or those recipes")
    plain = [i for i, r in enumerate(recipes) if not RECIPES[r["name"]].gradients]
    pending = PendingBatch([], None)
    if plain or keep is not None:
        pending = reduce_batch_async(lm, windows, [recipes[i] for i in plain], keep)
        pending.parts = [(plain[j], site, cols) for j, site, cols in pending.parts]
    wanted = [i for i, r in enumerate(recipes) if RECIPES[r["name"]].gradients]
    pending.parts += _gradient_parts(lm, windows, {i: recipes[i] for i in wanted})
    return pending


def _gradient_parts(lm: LoadedModel, windows: list[Window], recipes: dict[int, dict]
                    ) -> list[tuple[int, SiteKey, dict[str, torch.Tensor]]]:
    """Every gradient recipe's columns for the batch, slice by slice, merged, on the host."""
    ids, mask = (t.to(lm.device) for t in collate(windows, lm.pad_id))
    masks = SiteMasks(batch_masks(lm, windows, ids)).source
    fns = {key: scalar_fn(lm, key[0])[0] for key in {_pass_key(r) for r in recipes.values()}}
    pieces: dict[tuple[int, SiteKey], list[tuple[int, dict]]] = {}
    with gradient_mode(lm) as session:
        for lo, hi in grad_slices(lm, len(windows), ids.shape[1]):
            passes = _slice_passes(session, fns, ids[lo:hi], mask[lo:hi])
            for (i, site), cols in _apply(recipes, passes, masks.rows(lo, hi)).items():
                pieces.setdefault((i, site), []).append((lo, cols))
    return [(i, site, {k: v.detach().cpu() for k, v in _merge(parts).items()})
            for (i, site), parts in pieces.items()]


def _slice_passes(session: GradSession, fns: dict[tuple, ScalarFn], ids: torch.Tensor, mask: torch.Tensor
                  ) -> dict[tuple, Pass]:
    """The passes a slice needs: one plain pass per scalar, one integrated per (scalar, steps, rule)."""
    plain: dict[Scalar, Pass] = {}
    passes = {}
    for key, fn in fns.items():
        scalar, integral = key
        if scalar not in plain:
            plain[scalar] = gradient_pass(session, fn, ids, mask)
        passes[key] = plain[scalar] if integral is None else \
            integrated_pass(session, fn, ids, mask, plain[scalar], *integral)
    return passes


def _apply(recipes: dict[int, dict], passes: dict[tuple, Pass], masks
           ) -> dict[tuple[int, SiteKey], dict[str, torch.Tensor]]:
    """Every gradient recipe on every layer of one slice, layers in order (grad_rollout's carry)."""
    out, carry = {}, {}
    for i, spec in recipes.items():
        recipe = RECIPES[spec["name"]]
        params = {k: v for k, v in spec.items() if k not in _DRIVER_KEYS}
        result = passes[_pass_key(spec)]
        for site, (probs, grad) in result.layers.items():
            sal = LayerSaliency(site.layer, masks, probs, grad, result.scalar, result.baselines.get(site))
            if recipe.stateful:
                out[(i, site)], carry[(i, site.stack)] = recipe.fn(sal, carry.get((i, site.stack)), **params)
            else:
                out[(i, site)] = recipe.fn(sal, **params)
    return out
