"""One batch's interventions: each is one more forward pass (no capture, the job's backend)
with its edit at the seam, measured against the unedited pass of the same batch.

The unedited pass is the capture pass itself (pipeline/reduce.py keeps its `Outputs` when the
job has interventions), so a job with N interventions costs N + 1 passes per batch, not N + 2.
The intervened passes store no attention: their effect is the data (`effects` rows, one per
window and intervention).
"""

from __future__ import annotations

import numpy as np
import torch

from ..capture import editing
from ..errors import ModelError
from ..job import InterventionSpec, JobSpec
from ..reduce import batch_masks
from ..windows import Window, collate, tokenize
from .edits import Edit, donor_probs
from .effects import Outputs, measure
from .keys import WindowDocs, key_mask
from .spec import intervention_label

MEASURES = ("cosine", "kl_mean", "kl_last", "kl_class", "logit_diff", "logit_diff_clean")


def columns_read(job: JobSpec) -> list[str]:
    """The metadata columns the interventions read (key spans, paired texts)."""
    names = {s.patch_from for s in job.interventions} | {k.column for s in job.interventions
                                                        for k in (s.keys, s.except_keys) if k is not None}
    return sorted(n for n in names if n is not None)


def window_docs(rt, chosen: list[tuple[int, Window]], docs) -> WindowDocs:
    """The texts and read metadata of the batch's windows' documents (docs: the shard's)."""
    index = np.array([doc for doc, _ in chosen])
    rows = docs.rows[index]
    meta = rt.corpus.metadata(rows)
    return WindowDocs([docs.doc_ids[i] for i in index], rt.corpus.texts(rows),
                      {c: meta[c].to_pylist() for c in columns_read(rt.job)},
                      tuple(g.name for g in getattr(rt.job, "groups", [])))


def effects_batch(rt, windows: list[Window], docs: WindowDocs, clean: Outputs, targets: list[int]) -> dict:
    """The `effects` columns of one batch: every intervention on every window (batch_index
    points into `windows`)."""
    lm = rt.model
    ids, attention_mask = (t.to(lm.device) for t in collate(windows, lm.pad_id))
    masks = batch_masks(lm, windows, ids)
    cols: dict[str, list] = {k: [] for k in ("batch_index", "intervention", "label", "op", "keys", "note", *MEASURES)}
    for i, spec in enumerate(rt.job.interventions):
        edit, keys, notes = build_edit(rt, spec, windows, docs, masks, ids, attention_mask)
        with editing(edit, backend=lm.capture_backend, model=lm.model, causal=lm.causal):
            edited = Outputs.of(lm.forward(ids, attention_mask, **output_kwargs(rt.job)), attention_mask)
        found = {k: v.cpu().numpy() for k, v in measure(clean, edited, attention_mask, targets).items()}
        n = len(windows)
        cols["batch_index"] += range(n)
        cols["intervention"] += [i] * n
        cols["label"] += [intervention_label(spec, i)] * n
        cols["op"] += [spec.op] * n
        cols["keys"] += keys
        cols["note"] += notes
        for name in MEASURES:
            values = found.get(name)
            cols[name] += [None] * n if values is None else [
                None if note and spec.op == "patch" else float(v) for v, note in zip(values, notes)]
    return cols


def effects_bounded(rt, windows: list[Window], docs: WindowDocs, clean: Outputs, targets: list[int]) -> dict:
    """`effects_batch`, and when CUDA runs out of memory, of halves of the batch, recursively
    (as the capture pass, pipeline/shard.py)."""
    try:
        return effects_batch(rt, windows, docs, clean, targets)
    except torch.OutOfMemoryError:
        if len(windows) == 1:
            raise ModelError(f"one window of {len(windows[0])} tokens does not fit in GPU memory for its "
                             "interventions; lower model.max_length (or leave [effects] logits out)") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    half = len(windows) // 2
    parts = [(lo, effects_bounded(rt, windows[lo:hi], docs.rows(lo, hi),
                                  clean.rows(lo, hi, max(len(w) for w in windows[lo:hi])), targets))
             for lo, hi in ((0, half), (half, len(windows)))]
    return {k: [v + lo if k == "batch_index" else v for lo, cols in parts for v in cols[k]] for k in parts[0][1]}


def output_kwargs(job: JobSpec) -> dict:
    """A language model's final hidden states come with output_hidden_states."""
    return {"output_hidden_states": True} if job.effects.logits else {}


def build_edit(rt, spec: InterventionSpec, windows: list[Window], docs: WindowDocs, masks, ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[Edit, list[int], list[str | None]]:
    """The edit of one intervention on the batch, the keys it acts on per window, and notes."""
    lm = rt.model
    if spec.op != "patch":
        selection = spec.keys or spec.except_keys
        chosen = key_mask(selection, windows, docs, masks)  # (batch, key_pos)
        if spec.except_keys is not None:
            real = torch.arange(ids.shape[1], device=ids.device)[None, :] < masks.lengths[:, None]
            chosen = real & ~chosen
        notes = [None if n else "no key selected" for n in chosen.sum(1).tolist()]
        return Edit(spec, lm.num_heads, selected=chosen), chosen.sum(1).tolist(), notes
    donor_ids, rows, notes = paired_inputs(rt, spec, windows, docs, ids)
    layers = spec.layers if spec.layer_heads is None else sorted({layer for layer, _ in spec.layer_heads})
    donor = donor_probs(lm, donor_ids, attention_mask, layers)
    keys = [len(w) if ok else 0 for w, ok in zip(windows, rows.tolist())]
    return Edit(spec, lm.num_heads, donor=donor, patch_rows=rows), keys, notes


def paired_inputs(rt, spec: InterventionSpec, windows: list[Window], docs: WindowDocs, ids: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """The paired texts as a batch shaped like `ids`, and which windows can be patched: a pattern
    from another input fits only when that input is one window of the same token count (Vig et
    al.'s pairs differ in one word of one token). Other rows run on their own ids, unpatched."""
    lm = rt.model
    texts = ["" if t is None else str(t) for t in docs.metadata[spec.patch_from]]
    paired = tokenize(lm.tokenizer, texts, rt.window_length, rt.job.model.stride)
    by_doc: dict[int, list[Window]] = {}
    for p in paired:
        by_doc.setdefault(p.doc_index, []).append(p)
    donor_ids, ok, notes = ids.clone(), [], []
    for row, w in enumerate(windows):
        found = by_doc.get(row, [])
        note = None
        if w.window != 0 or len(found) != 1:
            note = f"paired text ({spec.patch_from}) is {len(found)} windows; patching needs one, and window 0"
        elif len(found[0]) != len(w):
            note = f"paired text ({spec.patch_from}) is {len(found[0])} tokens, the window {len(w)}"
        else:
            donor_ids[row, : len(w)] = torch.tensor(found[0].input_ids, device=ids.device)
        ok.append(note is None)
        notes.append(note)
    return donor_ids, torch.tensor(ok, device=ids.device), notes
