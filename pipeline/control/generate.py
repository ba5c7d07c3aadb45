"""Interventions in generate runs: each batch's prompts generated again with each intervention,
the text recorded beside the unedited generation (documents.generated_text).

Keys are chosen in the prompt the model reads (pipeline/generate/prompts.py): token positions
of the prompt, character spans or a regular expression on the prompt text, or a segment of it
(context, question, system, template, or the special tokens). Generated tokens are never acted
on, and except_keys means every prompt token but the named ones. The batch is left-padded and
its keys grow by one each step; an edit covers the prompt's keys and leaves the rest at zero.
"""

from __future__ import annotations

import numpy as np
import torch

from ..capture import editing
from ..job import KeysSpec
from .edits import Edit
from .keys import char_spans, overlapping
from .spec import intervention_label

PROMPT_SEGMENTS = ("context", "question", "system", "template")


def prompt_selection(keys: KeysSpec, prompt) -> list[bool]:
    """The prompt tokens a selection names."""
    if keys.positions is not None:
        wanted = set(keys.positions)
        return [i in wanted for i in range(len(prompt))]
    if keys.segment == "special":
        return list(prompt.window.special)
    if keys.segment is not None:
        return [s == keys.segment for s in prompt.segments]
    return overlapping(prompt.window.offsets, char_spans(keys, prompt.text))


def prompt_key_mask(spec, prompts: list, device: torch.device) -> torch.Tensor:
    """(batch, width) bool over the left-padded prompts: the keys the intervention acts on."""
    width = max(len(p) for p in prompts)
    chosen = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        picked = prompt_selection(spec.keys or spec.except_keys, p)
        if spec.except_keys is not None:
            picked = [not s for s in picked]
        chosen[row, width - len(p):] = torch.tensor(picked, dtype=torch.bool, device=device)
    return chosen


def generate_effects(rt, prompts: list, doc_ids: list[str], doc_index: np.ndarray) -> dict:
    """The `effects` columns of one generate batch: per prompt and intervention, the text the
    model generates with the intervention (its unedited text is documents.generated_text)."""
    from ..generate.decode import generate_batch

    lm = rt.model
    cols: dict[str, list] = {k: [] for k in ("doc_index", "window_index", "intervention", "label", "op", "keys",
                                             "note", "generated_text")}
    for i, spec in enumerate(rt.job.interventions):
        chosen = prompt_key_mask(spec, prompts, lm.device)
        with editing(Edit(spec, lm.num_heads, selected=chosen), backend=lm.capture_backend, model=lm.model,
                     causal=True):
            done = generate_batch(lm, prompts, doc_ids, rt.job.generate, [], lambda *args: None)
        counts = chosen.sum(1).tolist()
        cols["doc_index"] += doc_index.tolist()
        cols["window_index"] += [0] * len(prompts)
        cols["intervention"] += [i] * len(prompts)
        cols["label"] += [intervention_label(spec, i)] * len(prompts)
        cols["op"] += [spec.op] * len(prompts)
        cols["keys"] += counts
        cols["note"] += [None if n else "no key selected" for n in counts]
        cols["generated_text"] += [g.text for g in done]
    return cols
