"""The decoding loop: a batch of prompts, left-padded, through prefill and one step per token with
the KV cache, every attention call captured through the same per-layer seam as a forward pass.

- Prefill: each layer's (batch, head, prompt, prompt) attention goes through the job's recipes
  row by row, each row cut to its own tokens (its left padding dropped), so the prompt's rows are
  exactly what a forward pass over the prompt alone writes. The last query row of every layer
  is kept: it is step 0's (it predicts the first generated token).
- Step s >= 1: the new token's query row of every layer, stacked (layer, batch, head, keys), is
  reduced at once (pipeline/generate/steps.py).

Position ids follow the left padding (each row's first real token is position 0), as
`generate` does. Greedy, or sampled with one generator per document seeded from the job's seed and
its doc_id. Rows go out through `emit` every FLUSH_STEPS steps, so memory is bounded by the KV
cache, whatever the number of new tokens.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from ..capture import LayerInputs, capture_layers
from ..model import LoadedModel
from ..recipes import RECIPES
from ..reduce import batch_masks, reduce_layer, window_slices
from . import steps as step_rows
from .prompts import Prompt

FLUSH_STEPS = 32

# (table, layer, recipe index or None, columns with batch_index = row of the batch)
Emit = Callable[[str, int | None, int | None, dict], None]


@dataclass
class Generated:
    """One document's generation."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    stop_reason: str | None = None
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)


def row_probs(inputs: LayerInputs) -> torch.Tensor:
    """(batch, head, 1, keys) float32: the last query row's probabilities."""
    if inputs.given is not None:
        return inputs.given[:, :, -1:, :].float()
    query, key = inputs.query[:, :, -1:].float(), inputs.key.float()
    batch, heads, _, dim = query.shape
    kv = key.shape[1]  # grouped-query attention: query head i reads key/value head i // n_rep
    scores = torch.matmul(query.reshape(batch, kv, heads // kv, dim), key.transpose(-1, -2))
    scores = scores.reshape(batch, heads, 1, -1).mul_(inputs.scaling)
    if inputs.position_bias is not None:
        scores += inputs.position_bias[..., -1:, :].float()
    mask = inputs.additive(q0=inputs.query.shape[2] - 1)
    if mask is not None:
        scores += mask
    return torch.softmax(scores, dim=-1)


def _right_aligned(inputs: LayerInputs, pads: torch.Tensor) -> LayerInputs:
    """A prefill layer's inputs with each row moved left by its padding: every prompt starts at
    position 0 and its padding follows it, the layout of a forward batch, so the recipes take the
    whole batch at once and write the prompt's own positions. The mask, in the backend's form
    (and any given probabilities), moves along both position axes; a missing mask of a causal
    layer is spelled out. Without padding (one prompt, or prompts of one length) nothing moves."""
    batch, _, size, _ = inputs.query.shape
    if not bool(pads.any()):
        return inputs
    index = (torch.arange(size, device=pads.device)[None, :] + pads[:, None]) % size  # (batch, pos)

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * t.dim()
        shape[0], shape[dim] = batch, size
        view = index.view(shape).expand(*[t.shape[i] if i not in (0, dim) else shape[i] for i in range(t.dim())])
        return t.gather(dim, view)

    def both(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
        return along(along(t, 2), 3)

    mask = inputs.mask
    if mask is None and (inputs.causal or inputs.implied_causal):
        low = torch.finfo(inputs.query.dtype).min
        mask = torch.zeros(1, 1, size, size, device=inputs.query.device, dtype=inputs.query.dtype).masked_fill(
            torch.ones(size, size, dtype=torch.bool, device=inputs.query.device).triu(1), low)
    return LayerInputs(inputs.site, along(inputs.query, 2), along(inputs.key, 2), inputs.scaling, both(mask),
                       both(inputs.position_bias), inputs.n_rep, inputs.causal, inputs.sliding_window,
                       both(inputs.given))


def _generator(seed: int, doc_id: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\t{doc_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _choose(logits: torch.Tensor, gen, generators: list[torch.Generator] | None) -> torch.Tensor:
    """(batch,) next tokens: argmax, or a draw from the tempered, top-k / top-p restricted softmax."""
    if not gen.sample:
        return logits.argmax(-1)
    scores = logits / gen.temperature
    if gen.top_k:
        kth = scores.topk(min(gen.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= gen.top_p  # keep the smallest set reaching top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1).cpu()
    return torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(generators)])


def stop_ids(lm: LoadedModel) -> set[int]:
    """End-of-sequence ids: the generation config's and the tokenizer's."""
    found: set[int] = set()
    for value in (getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None),
                  lm.tokenizer.eos_token_id):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found


def decoded(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The generated text (special tokens left out) and each token's span in it. A token that ends
    inside a character (byte-level pieces of one character) gets an empty span at the end of the
    text so far; the token that completes the character spans it."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    spans, end = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        start = end
        if text.startswith(prefix):
            end = len(prefix)
        spans.append((start, max(start, end)))
    return text, spans


class _Session:
    """State of one batch's generation, shared by the capture sink and the loop."""

    def __init__(self, lm: LoadedModel, prompts: list[Prompt], recipes: list[dict], emit: Emit):
        self.lm, self.prompts, self.recipes, self.emit = lm, prompts, recipes, emit
        self.lengths = [len(p) for p in prompts]
        self.width = max(self.lengths)
        self.pads = [self.width - n for n in self.lengths]
        self.step_specs = [(i, r) for i, r in enumerate(recipes) if r["name"] in step_rows.STEP_RECIPES
                           and r.get("level", "token") == "token"]
        self.rows: list[torch.Tensor] = []  # this forward's per-layer query rows
        self.prefill = True
        self.step = 0  # of the forward in progress: 0 the prefill, s the step that feeds token s - 1
        self.masks = None  # BatchMasks of the prompts, right-aligned (set by generate_batch)
        self.slices: list[tuple[int, int]] = []
        self.sliced: list | None = None  # the masks of each slice
        self.carries: dict[tuple[int, str], dict] = {}
        self.pending: dict[tuple[str, int | None], list[dict]] = {}

    def sink(self, inputs: LayerInputs) -> None:
        if inputs.site.kind != "self":
            return
        inputs.site = replace(inputs.site, step=self.step)
        self.rows.append(row_probs(inputs)[:, :, 0])  # (batch, head, keys)
        if self.prefill:
            self._prefill_recipes(inputs)

    def _prefill_recipes(self, inputs: LayerInputs) -> None:
        """The prompts' own attention through the job's recipes, as a forward batch of them (each
        row without its left padding), a few prompts at a time on a CPU (reduce.window_slices),
        a long prompt's queries a block at a time (reduce.query_blocks)."""
        site = inputs.site
        right = _right_aligned(inputs, torch.tensor(self.pads, device=inputs.query.device))
        if self.sliced is None:
            self.sliced = [self.masks] if len(self.slices) == 1 else [self.masks.rows(lo, hi) for lo, hi in self.slices]
        for i, cols in reduce_layer(self.lm, site, right, self.sliced, self.slices, self.recipes, self.carries):
            cols = {k: v.cpu().numpy() for k, v in cols.items()}
            self.emit(RECIPES[self.recipes[i]["name"]].table, site.layer, i, cols)

    def stacked(self) -> torch.Tensor:
        p = torch.stack(self.rows)  # (layer, batch, head, keys)
        self.rows = []
        return p

    def add(self, table: str, recipe: int | None, cols: dict[str, torch.Tensor], step: int) -> None:
        cols = {k: v.cpu().numpy() for k, v in cols.items()}
        cols["step"] = np.full(len(cols["layer"]), step, dtype=np.int32)
        self.pending.setdefault((table, recipe), []).append(cols)

    def flush(self) -> None:
        """Accumulated step rows to `emit`, a layer at a time."""
        for (table, recipe), parts in self.pending.items():
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            layer = cols.pop("layer")
            for value in np.unique(layer):
                keep = layer == value
                self.emit(table, int(value), recipe, {k: v[keep] for k, v in cols.items()})
        self.pending = {}


def generate_batch(lm: LoadedModel, prompts: list[Prompt], doc_ids: list[str], gen, recipes: list[dict],
                   emit: Emit) -> list[Generated]:
    """Generate for `prompts` (one batch); recipe, head_stats, edges and grounding rows go to
    `emit` (batch_index = the prompt's index in `prompts`)."""
    from transformers import DynamicCache

    device, tok = lm.device, lm.tokenizer
    s = _Session(lm, prompts, recipes, emit)
    batch, width = len(prompts), s.width
    ids = torch.full((batch, width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, s.pads[b]:] = torch.tensor(p.window.input_ids)
        mask[b, s.pads[b]:] = 1
    ids, mask = ids.to(device), mask.to(device)
    words = any(r.get("level") == "word" for r in recipes)
    right_ids = torch.full_like(ids, lm.pad_id)
    for b, p in enumerate(prompts):
        right_ids[b, :len(p)] = ids[b, s.pads[b]:]
    s.masks = batch_masks(lm, [p.window for p in prompts], right_ids, causal=True, words=words)
    s.slices = window_slices(lm, batch, width)
    facts = _key_facts(lm, prompts, ids, s.pads)
    generators = [_generator(gen.seed, d) for d in doc_ids] if gen.sample else None
    eos = stop_ids(lm)
    out = [Generated() for _ in prompts]
    alive = torch.ones(batch, dtype=torch.bool)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # transformers 5.2x names the KV cache argument `cache`; earlier 5.x, `past_key_values`
    cached = {_cache_argument(lm.model): DynamicCache(config=lm.model.config), "use_cache": True}
    if "logits_to_keep" in inspect.signature(lm.model.forward).parameters:
        cached["logits_to_keep"] = 1  # the prefill's logits for its last position only, not (prompt, vocab)
    with torch.inference_mode(), capture_layers(s.sink, backend=lm.capture_backend, model=lm.model, causal=True):
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cached).logits[:, -1, :].float()
        s.prefill = False
        step = 0
        _reduce_step(s, s.stacked(), facts, alive, step, grounding_only=True)
        while True:
            logp = torch.log_softmax(logits, dim=-1).cpu()
            if eos and step < gen.min_new_tokens:  # as generate's min_new_tokens: no end before it
                logits[:, [i for i in sorted(eos) if i < logits.shape[-1]]] = float("-inf")
            chosen = _choose(logits, gen, generators).cpu()
            entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
            for b in alive.nonzero()[:, 0].tolist():
                g = out[b]
                token = int(chosen[b])
                g.ids.append(token)
                g.logprobs.append(float(logp[b, token]))
                g.entropies.append(float(entropy[b]))
                if token in eos:
                    g.stop_reason = "eos"
                elif gen.stop and _hits_stop(tok, g.ids, gen.stop):
                    g.stop_reason = "stop"
                elif len(g.ids) >= gen.max_new_tokens:
                    g.stop_reason = "length"
                if g.stop_reason:
                    alive[b] = False
            if not alive.any():
                break
            step += 1
            s.step = step
            feed = torch.where(alive, chosen, torch.full_like(chosen, lm.pad_id)).to(device)[:, None]
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            logits = lm.model(input_ids=feed, attention_mask=mask, position_ids=positions,
                              **cached).logits[:, -1, :].float()
            _reduce_step(s, s.stacked(), facts, alive, step)
            if step % FLUSH_STEPS == 0:
                s.flush()
    s.flush()
    for g in out:
        g.text, g.offsets = decoded(tok, g.ids)
    return out


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _hits_stop(tok, ids: list[int], stops: list[str]) -> bool:
    """Whether the text ends in a stop string that the last token completed."""
    tail = tok.decode(ids[-max(8, max(len(x) for x in stops)):], skip_special_tokens=True)
    before = tok.decode(ids[-max(8, max(len(x) for x in stops)):-1], skip_special_tokens=True)
    return any(x in tail and x not in before for x in stops)


def _key_facts(lm: LoadedModel, prompts: list[Prompt], ids: torch.Tensor, pads: list[int]) -> step_rows.KeyFacts:
    batch, width = ids.shape
    device = ids.device
    real = torch.zeros((batch, width), dtype=torch.bool, device=device)
    context = torch.zeros_like(real)
    special = torch.zeros_like(real)
    has_context = any("context" in p.segments for p in prompts)
    for b, p in enumerate(prompts):
        real[b, pads[b]:] = True
        special[b, pads[b]:] = torch.tensor(p.window.special, device=device)
        if has_context:
            context[b, pads[b]:] = torch.tensor([seg == "context" for seg in p.segments], device=device)
    if not has_context:
        context = real.clone()
    sep = torch.isin(ids, torch.tensor(sorted(lm.sep_ids) or [-1], device=device)) & real
    punct = lm.punct_table.to(device)[ids] & real
    return step_rows.KeyFacts(torch.tensor(pads, device=device), real, context, real.clone(), special, sep, punct,
                              torch.tensor([len(p) for p in prompts], device=device))


def _reduce_step(s: _Session, p: torch.Tensor, facts, alive: torch.Tensor, step: int,
                 grounding_only: bool = False) -> None:
    """One step's rows for the rows still generating: grounding, and (after step 0, whose query
    row is the prompt's own) head statistics and edges."""
    rows = alive.nonzero()[:, 0].to(p.device)
    if rows.numel() == 0:
        return
    s.add("grounding", None, step_rows.flatten(step_rows.grounding(p, facts, step), rows), step)
    if grounding_only:
        return
    for i, spec in s.step_specs:
        name = spec["name"]
        if name == "head_stats":
            cols = step_rows.flatten(step_rows.head_stats(p, facts), rows)
        else:
            params = {k: v for k, v in spec.items() if k not in ("name", "level")}
            cols = step_rows.edges(p, facts, name, params)
            keep = alive.to(p.device)[cols["batch_index"]]
            cols = {k: v[keep] for k, v in cols.items()}
            cols["query_pos"] = (facts.prompt_length[cols["batch_index"]] + step - 1).to(torch.int32)
        s.add(RECIPES[name].table, i, cols, step)
