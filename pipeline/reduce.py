"""One batch through the model: every layer's attention goes through every recipe on the device,
and only the recipes' (small) outputs come back to the host."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .capture import LayerInputs, SiteKey, capture_layers
from .model import LoadedModel
from .recipes import RECIPES, BatchMasks, LayerAttention, needs_whole_map
from .recipes.attention import WordPooling
from .recipes.compiled import COMPILED, CompiledAttention, Needs, kernel_needs
from .recipes.fused import FUSED, FusedAttention
from .windows import Target, Window, collate


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


def batch_masks(lm: LoadedModel, windows: list[Window] | list[Target], ids: torch.Tensor,
                causal: bool | None = None, words: bool = False) -> BatchMasks:
    """The masks of a batch of windows (or of their targets, with causal=True), ids (batch, pos);
    with `words`, also the windows' words (for recipes at level "word")."""
    lengths = torch.tensor([len(w) for w in windows], device=ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    special = torch.zeros_like(valid)
    for row, w in enumerate(windows):
        special[row, : len(w)] = torch.tensor(w.special, device=ids.device)
    sep = torch.isin(ids, torch.tensor(sorted(lm.sep_ids), device=ids.device, dtype=ids.dtype)) & valid
    punct = lm.punct_table.to(ids.device)[ids] & valid
    masks = BatchMasks(lengths, special, sep, punct, lm.causal if causal is None else causal)
    if words:
        masks.words = word_pooling(windows, masks)
    if any(getattr(w, "groups", None) is not None for w in windows):  # the job's [[groups]] (groups recipe)
        masks.groups = token_group_masks(windows, ids.shape[1], ids.device)
    return masks


def token_group_masks(windows: list[Window], size: int, device) -> torch.Tensor:
    """(batch, group, pos) bool: the token groups of each window (Window.groups), padding in none."""
    count = len(windows[0].groups)
    out = torch.zeros((len(windows), count, size), dtype=torch.bool)
    for row, w in enumerate(windows):
        if w.groups:
            out[row, :, : len(w)] = torch.tensor(w.groups, dtype=torch.bool)
    return out.to(device)


def word_pooling(windows: list[Window] | list[Target], masks: BatchMasks) -> WordPooling:
    """The batch's words: the (batch, word, pos) membership matrix, and word-level masks whose
    flags hold for a word when they hold for all its pieces."""
    device = masks.lengths.device
    if any(w.words is None for w in windows):
        raise ValueError("word-level recipes need each window's words (windows.tokenize and pairs.tokenize_pairs "
                         "fill them)")
    counts = [max(w.words) + 1 if len(w) else 0 for w in windows]
    total = torch.zeros(len(windows), max(counts), masks.size, device=device)
    for row, w in enumerate(windows):
        total[row, torch.tensor(w.words, device=device), torch.arange(len(w), device=device)] = 1.0
    pieces = total.sum(-1)  # (batch, word)

    def every_piece(flags: torch.Tensor) -> torch.Tensor:  # (batch, pos) -> (batch, word)
        return ((total @ flags.float()[:, :, None])[..., 0] == pieces) & (pieces > 0)

    word_masks = BatchMasks(torch.tensor(counts, device=device), every_piece(masks.special),
                            every_piece(masks.sep), every_piece(masks.punct), masks.causal)
    return WordPooling(total, word_masks)


@dataclass
class SiteMasks:
    """Which masks each attention site of a batch uses: the source's for encoder (and single-stack)
    self-attention; for source/target pairs the target's (causal) for decoder self-attention, and
    target queries over source keys for cross-attention."""

    source: BatchMasks
    target: BatchMasks | None = None

    def __post_init__(self):
        self.cross = None if self.target is None else replace(self.target, causal=False, keys=self.source)

    def of(self, site: SiteKey) -> BatchMasks | None:
        """None for a site this batch does not reduce (cross-attention without a target)."""
        if site.kind == "cross":
            return self.cross
        return self.target if self.target is not None and site.stack == "decoder" else self.source


def apply_recipes(att: LayerAttention, recipes: list[dict], carry: dict[int, torch.Tensor]
                  ) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Every recipe on one layer; `carry` holds stateful recipes' state between layers of one
    stack. Rollout multiplies a stack's self-attention maps, so it skips cross-attention."""
    # recipes the kernels compute their own way (token level only)
    own = FUSED if isinstance(att, FusedAttention) and att.supported else \
        COMPILED if isinstance(att, CompiledAttention) else {}
    out = []
    for i, spec in enumerate(recipes):
        recipe = RECIPES[spec["name"]]
        params = {k: v for k, v in spec.items() if k not in ("name", "level")}
        # Word level: the torch recipe on the layer's word-pooled maps (formed once per layer).
        words = spec.get("level") == "word"
        on = att.words if words else att
        if recipe.stateful:
            if att.masks.cross:
                continue
            cols, carry[i] = recipe.fn(on, carry.get(i), **params)
        else:
            cols = (own[recipe.name] if not words and recipe.name in own else recipe.fn)(on, **params)
        out.append((i, cols))
    return out


@dataclass
class PendingBatch:
    """A batch's recipe outputs on their way to the host. On CUDA the copies into pinned host
    memory are issued without blocking, so the next batch can start; `outputs()` waits for them."""

    parts: list[tuple[int, SiteKey, dict[str, torch.Tensor]]]  # (recipe, site, host columns)
    event: "torch.cuda.Event | None" = None
    clean: object = None  # control.effects.Outputs of this pass, when the job has interventions

    def outputs(self) -> list[Output]:
        if self.event is not None:
            self.event.synchronize()
        return [Output(i, site.layer, {k: v.numpy() for k, v in cols.items()}, site.stack, site.kind)
                for i, site, cols in self.parts]


CPU_SLICE_BYTES = 8 << 20  # of one layer's float32 probabilities: a few windows (measured best of 1-32 MiB)
KERNEL_BLOCK_BYTES = 32 << 20  # a CPU's block of a long window for the compiled kernel (8 and 64 measured slower)
DEVICE_BLOCK_BYTES = 1 << 30  # on an accelerator, the probabilities of a batch beyond which queries go in blocks


def window_slices(lm: LoadedModel, windows: int, size: int, maps: int | None = None) -> list[tuple[int, int]]:
    """Ranges of the batch's windows that the recipes take one at a time. On a CPU each holds
    about CPU_SLICE_BYTES of probabilities (`maps` (batch, T, T) maps per window: every head's,
    or one, the head mean, when the compiled kernel forms no head's map), so the recipes'
    passes over them hit the cache and the sdpa backend never forms the whole batch's map;
    elsewhere, the whole batch."""
    if lm.device.type != "cpu":
        return [(0, windows)]
    step = max(1, CPU_SLICE_BYTES // ((maps or lm.num_heads) * size * size * 4))
    return [(lo, min(lo + step, windows)) for lo in range(0, windows, step)]


def query_blocks(lm: LoadedModel, windows: int, queries: int, keys: int,
                 maps: int | None = None) -> list[tuple[int, int]] | None:
    """Blocks of query rows for windows whose probabilities (`maps` per window, as in
    window_slices) exceed the budget (CPU_SLICE_BYTES on a CPU, DEVICE_BLOCK_BYTES elsewhere), so
    a layer of a long window takes O(block x T) memory, never its (head, T, T) map; None when
    the windows fit whole."""
    if lm.device.type != "cpu":
        budget = DEVICE_BLOCK_BYTES
    else:  # the compiled kernel's threads each take rows of a block: give them enough
        budget = CPU_SLICE_BYTES if maps is None else KERNEL_BLOCK_BYTES
    row = (maps or lm.num_heads) * keys * 4 * windows  # one query row of every window's maps
    if row * queries <= budget or queries <= 1:
        return None
    step = max(16, budget // row)
    return [(q0, min(q0 + step, queries)) for q0 in range(0, queries, step)]


def _merge(parts: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """One recipe's columns from several slices (first window `lo`), batch_index made whole."""
    if len(parts) == 1 and parts[0][0] == 0:
        return parts[0][1]
    return {k: torch.cat([cols[k] + lo if k == "batch_index" else cols[k] for lo, cols in parts])
            for k in parts[0][1]}


def _merge_blocks(kind: str, parts: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """One recipe's columns from the query blocks of the same windows (first query `q0`): rows
    with query_pos made whole ("rows"), or the blocks' sums added up ("sum": head statistics,
    whose rows are the same (window, head) in every block)."""
    if kind == "rows":
        return {k: torch.cat([cols[k] + q0 if k == "query_pos" else cols[k] for q0, cols in parts])
                for k in parts[0][1]}
    first = parts[0][1]
    return {k: sum((cols[k] for _, cols in parts[1:]), first[k]) if k not in KEY_COLUMNS and first[k].is_floating_point()
            else first[k] for k in first}


KEY_COLUMNS = ("batch_index", "head", "window_tokens")


def compiled_needs(lm: LoadedModel, recipes: list[dict]) -> Needs | None:
    """What the compiled CPU kernel computes for these recipes; None without it (not a CPU, or it
    did not build: LoadedModel.cpu_kernel)."""
    return kernel_needs(recipes) if getattr(lm, "cpu_kernel", False) else None


def compiled_maps(lm: LoadedModel, needs: Needs | None) -> int | None:
    """How many (T, T) maps per window the kernel hands the recipes (every head's, or at most the
    head mean), for window_slices and query_blocks; None without the kernel."""
    return None if needs is None else lm.num_heads if needs.probs else 1


def _layer_attention(site: SiteKey, masks: BatchMasks, inputs: LayerInputs, rows: tuple[int, int] | None,
                     needs: Needs | None) -> LayerAttention:
    """The compiled kernel's LayerAttention where it takes the layer and these windows (masks
    that say what the layer's mask says), else the torch ops'."""
    masking = inputs.kernel_masking if needs is not None else None
    if masking is not None and not masks.cross and masks.causal == masking[1] and torch.equal(
            masks.lengths, masking[0][slice(*rows) if rows else slice(None)]):
        return CompiledAttention(site.layer, masks, inputs, rows, needs)
    return LayerAttention(None, site.layer, masks, inputs, rows=rows)


def reduce_layer(lm: LoadedModel, site: SiteKey, inputs: LayerInputs, masks: list[BatchMasks],
                 slices: list[tuple[int, int]], recipes: list[dict],
                 carries: dict[tuple[int, str], dict[int, torch.Tensor]]) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """One layer's inputs through every recipe on the torch path (or the compiled CPU kernel's,
    recipes/compiled.py), `slices` of windows (`masks` theirs) at a time, and a long window's
    queries a block at a time (query_blocks); each recipe's columns merged, batch_index and
    query_pos made whole. `carries` holds stateful recipes' state per (slice, stack)."""
    parts: dict[int, list[tuple[int, dict[str, torch.Tensor]]]] = {}
    blockable = not any(needs_whole_map(r) for r in recipes)
    needs = compiled_needs(lm, recipes)
    maps = compiled_maps(lm, needs)
    for n, ((lo, hi), part_masks) in enumerate(zip(slices, masks)):
        rows = None if len(slices) == 1 else (lo, hi)
        blocks = query_blocks(lm, hi - lo, inputs.query.shape[2], inputs.key.shape[2],
                              maps) if blockable else None
        if blocks is None:
            att = _layer_attention(site, part_masks, inputs, rows, needs)
            for i, cols in apply_recipes(att, recipes, carries.setdefault((n, site.stack), {})):
                parts.setdefault(i, []).append((lo, cols))
            continue
        per_block: dict[int, list[tuple[int, dict[str, torch.Tensor]]]] = {}
        causal = part_masks.causal and not part_masks.cross  # a block's queries see no key past it
        # A long window: its queries a block at a time, the last first. A causal block reads keys
        # up to its last query, so the blocks shrink and each fits where the one before was freed
        # (first to last, growing sizes fragmented the heap: 4.1 GiB peak at 32k tokens, not 1.3).
        for q0, q1 in reversed(blocks):
            att = _layer_attention(site, part_masks.queries(q0, q1, q1 if causal else None), inputs, rows, needs)
            for i, cols in apply_recipes(att, recipes, {}):
                per_block.setdefault(i, []).append((q0, cols))
        for i, cols in per_block.items():
            parts.setdefault(i, []).append((lo, _merge_blocks(RECIPES[recipes[i]["name"]].blocks, cols)))
    return [(i, _merge(cols)) for i, cols in parts.items()]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def reduce_batch_async(lm: LoadedModel, windows: list[Window], recipes: list[dict],
                       keep: dict | None = None) -> PendingBatch:
    """One batch through the model; every attention layer (encoder and decoder self-attention,
    cross-attention when the windows carry targets) through every recipe. With `keep` (keyword
    arguments of the model call), the pass's outputs are kept as `PendingBatch.clean`: the
    unedited pass that interventions are measured against (pipeline/control/run.py)."""
    if any(RECIPES[r["name"]].gradients for r in recipes):  # saliency: a backward pass too
        from .control.gradients import reduce_batch_grad
        return reduce_batch_grad(lm, windows, recipes, keep)
    ids, attention_mask = (t.to(lm.device) for t in collate(windows, lm.pad_id))
    decoder: dict[str, torch.Tensor] = {}
    words = any(r.get("level") == "word" for r in recipes)
    masks = SiteMasks(batch_masks(lm, windows, ids, words=words))
    if windows[0].target is not None:  # source/target pairs: the decoder runs teacher-forced
        targets = [w.target for w in windows]
        dec_ids, dec_mask = (t.to(lm.device) for t in collate(targets, lm.pad_id))
        decoder = {"decoder_input_ids": dec_ids, "decoder_attention_mask": dec_mask}
        masks = SiteMasks(masks.source, batch_masks(lm, targets, dec_ids, causal=True, words=words))
    pending: list[tuple[int, SiteKey, dict[str, torch.Tensor]]] = []
    size = max(ids.shape[1], decoder["decoder_input_ids"].shape[1] if decoder else 0)
    slices = window_slices(lm, len(windows), size, compiled_maps(lm, compiled_needs(lm, recipes)))
    sliced: dict[int, list[BatchMasks]] = {}  # id(masks) -> the masks of each slice
    carries: dict[tuple[int, str], dict[int, torch.Tensor]] = {}  # (slice, stack) -> stateful recipes' state

    def sink(inputs: LayerInputs) -> None:
        site = inputs.site
        site_masks = masks.of(site)
        if site_masks is None:
            return
        if lm.kernels is not None:
            att = FusedAttention(site.layer, site_masks, inputs, lm.kernels)
            for i, cols in apply_recipes(att, recipes, carries.setdefault((0, site.stack), {})):
                pending.append((i, site, {k: _to_host(v) for k, v in cols.items()}))
            return
        if id(site_masks) not in sliced:
            sliced[id(site_masks)] = [site_masks] if len(slices) == 1 else [site_masks.rows(lo, hi) for lo, hi in slices]
        for i, cols in reduce_layer(lm, site, inputs, sliced[id(site_masks)], slices, recipes, carries):
            pending.append((i, site, {k: _to_host(v) for k, v in cols.items()}))

    # On a CPU the sliced recipes form every row's probabilities: the layers' outputs come from
    # them (capture_layers(outputs=True)) instead of a second attention in SDPA. Not for the
    # unedited pass of interventions: the edited pass computes its unedited layers in SDPA, and
    # the two must differ only where the edits are.
    outputs = lm.device.type == "cpu" and lm.kernels is None and keep is None
    with capture_layers(sink, backend=lm.capture_backend, model=lm.model, causal=lm.causal, outputs=outputs):
        output = lm.forward(ids, attention_mask, **decoder, **(keep or {}))
    clean = None
    if keep is not None:
        from .control.effects import Outputs

        clean = Outputs.of(output, attention_mask)
    del output
    event = None
    if lm.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return PendingBatch(pending, event, clean)


def reduce_batch(lm: LoadedModel, windows: list[Window], recipes: list[dict]) -> list[Output]:
    return reduce_batch_async(lm, windows, recipes).outputs()
