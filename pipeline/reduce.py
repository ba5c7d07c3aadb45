"""One batch through the model: every layer's attention goes through every recipe on the device,
and only the recipes' (small) outputs come back to the host."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .capture import LayerInputs, SiteKey, capture_layers
from .model import LoadedModel
from .recipes import RECIPES, BatchMasks, LayerAttention
from .recipes.fused import FusedAttention
from .windows import Window, collate


@dataclass
class Output:
    """One recipe's rows for one layer of one batch; `batch_index` points into the batch."""

    recipe: int  # index into the job's recipe list
    layer: int
    columns: dict[str, np.ndarray]
    stack: str = "encoder"  # the site of the layer: encoder or decoder stack, self or cross attention
    attention: str = "self"

    @property
    def site(self) -> tuple[str, str]:
        return self.stack, self.attention


def batch_masks(lm: LoadedModel, windows: list[Window], ids: torch.Tensor) -> BatchMasks:
    lengths = torch.tensor([len(w) for w in windows], device=ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    special = torch.zeros_like(valid)
    for row, w in enumerate(windows):
        special[row, : len(w)] = torch.tensor(w.special, device=ids.device)
    sep = torch.isin(ids, torch.tensor(sorted(lm.sep_ids), device=ids.device, dtype=ids.dtype)) & valid
    punct = lm.punct_table.to(ids.device)[ids] & valid
    return BatchMasks(lengths, special, sep, punct, lm.causal)


def apply_recipes(att: LayerAttention, recipes: list[dict], carry: dict[int, torch.Tensor]
                  ) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Every recipe on one layer; `carry` holds stateful recipes' state between layers."""
    from .recipes.fused import FUSED

    fused = isinstance(att, FusedAttention) and att.supported
    out = []
    for i, spec in enumerate(recipes):
        recipe = RECIPES[spec["name"]]
        params = {k: v for k, v in spec.items() if k != "name"}
        if recipe.stateful:
            cols, carry[i] = recipe.fn(att, carry.get(i), **params)
        else:
            cols = (FUSED[recipe.name] if fused and recipe.name in FUSED else recipe.fn)(att, **params)
        out.append((i, cols))
    return out


@dataclass
class PendingBatch:
    """A batch's recipe outputs on their way to the host. On CUDA the copies into pinned host
    memory are issued without blocking, so the next batch can start; `outputs()` waits for them."""

    parts: list[tuple[int, SiteKey, dict[str, torch.Tensor]]]  # (recipe, site, host columns)
    event: "torch.cuda.Event | None" = None

    def outputs(self) -> list[Output]:
        if self.event is not None:
            self.event.synchronize()
        return [Output(i, site.layer, {k: v.numpy() for k, v in cols.items()}, site.stack, site.kind)
                for i, site, cols in self.parts]


CPU_SLICE_BYTES = 8 << 20  # of one layer's float32 probabilities: a few windows (measured best of 1-32 MiB)


def window_slices(lm: LoadedModel, windows: int, size: int) -> list[tuple[int, int]]:
    """Ranges of the batch's windows that the recipes take one at a time. On a CPU each holds
    about CPU_SLICE_BYTES of probabilities, so the recipes' passes over them hit the cache and
    the sdpa backend never forms the whole batch's map; elsewhere, the whole batch."""
    if lm.device.type != "cpu":
        return [(0, windows)]
    step = max(1, CPU_SLICE_BYTES // (lm.num_heads * size * size * 4))
    return [(lo, min(lo + step, windows)) for lo in range(0, windows, step)]


def _merge(parts: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """One recipe's columns from several slices (first window `lo`), batch_index made whole."""
    if len(parts) == 1 and parts[0][0] == 0:
        return parts[0][1]
    return {k: torch.cat([cols[k] + lo if k == "batch_index" else cols[k] for lo, cols in parts])
            for k in parts[0][1]}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def reduce_batch_async(lm: LoadedModel, windows: list[Window], recipes: list[dict]) -> PendingBatch:
    """One batch through the model; every self-attention layer through every recipe."""
    ids, attention_mask = (t.to(lm.device) for t in collate(windows, lm.pad_id))
    masks = batch_masks(lm, windows, ids)
    pending: list[tuple[int, SiteKey, dict[str, torch.Tensor]]] = []
    slices = window_slices(lm, len(windows), ids.shape[1])
    slice_masks = [masks] if len(slices) == 1 else [masks.rows(lo, hi) for lo, hi in slices]
    carries: list[dict[int, torch.Tensor]] = [{} for _ in slices]  # stateful recipes' state, per slice

    def sink(inputs: LayerInputs) -> None:
        if inputs.site.kind != "self":
            return
        layer = inputs.site.layer
        if lm.kernels is not None:
            att = FusedAttention(layer, masks, inputs, lm.kernels)
            for i, cols in apply_recipes(att, recipes, carries[0]):
                pending.append((i, inputs.site, {k: _to_host(v) for k, v in cols.items()}))
            return
        parts: dict[int, list[tuple[int, dict[str, torch.Tensor]]]] = {}
        for (lo, hi), part_masks, carry in zip(slices, slice_masks, carries):
            att = LayerAttention(None, layer, part_masks, inputs, rows=None if len(slices) == 1 else (lo, hi))
            for i, cols in apply_recipes(att, recipes, carry):
                parts.setdefault(i, []).append((lo, cols))
        for i, cols in parts.items():
            pending.append((i, inputs.site, {k: _to_host(v) for k, v in _merge(cols).items()}))

    with capture_layers(sink, backend=lm.capture_backend, model=lm.model, causal=lm.causal):
        lm.forward(ids, attention_mask)
    event = None
    if lm.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return PendingBatch(pending, event)


def reduce_batch(lm: LoadedModel, windows: list[Window], recipes: list[dict]) -> list[Output]:
    return reduce_batch_async(lm, windows, recipes).outputs()
