"""Which keys of each window an intervention selects.

A selection ([[interventions]] keys or except_keys) names keys in one of five ways; each becomes
a (batch, key_pos) bool matrix for the batch's windows:

- positions: token positions within each window;
- spans: character [start, end) spans of the document text, given in the job;
- regex: the spans of a regular expression's matches in the document text;
- column: the spans a metadata column holds for each document ([start, end) or a list of them);
- segment: the tokens of one kind (special, sep, punct: the batch's own token flags);
- group: the tokens of a [[groups]] entry (pipeline/groups.py: words, word files, marked spans).

A token is selected by a span when its characters overlap it (token [a, b) and span [s, e):
a < e and b > s); special tokens cover no characters, so only positions and segments reach them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import CorpusError
from ..job import KeysSpec
from ..recipes.attention import BatchMasks
from ..windows import Window


@dataclass
class WindowDocs:
    """What key selection needs to know about each window's document: its id, text and the
    values of the metadata columns the interventions read."""

    doc_ids: list[str]
    texts: list[str]
    metadata: dict[str, list]  # column -> one value per window
    groups: tuple[str, ...] = ()  # the job's [[groups]] names, in the order of Window.groups

    def rows(self, lo: int, hi: int) -> "WindowDocs":
        return WindowDocs(self.doc_ids[lo:hi], self.texts[lo:hi], {k: v[lo:hi] for k, v in self.metadata.items()},
                          self.groups)


def char_spans(keys: KeysSpec, text: str, value=None, where: str = "") -> list[tuple[int, int]]:
    """The character spans a selection names in one document (`value`: its metadata column's)."""
    if keys.spans is not None:
        return [(s, e) for s, e in keys.spans]
    if keys.regex is not None:
        return [m.span() for m in re.finditer(keys.regex, text) if m.end() > m.start()]
    if keys.column is not None:
        return column_spans(value, where)
    return []


def column_spans(value, where: str) -> list[tuple[int, int]]:
    """A metadata value as spans: null (none), [start, end), or a list of [start, end) pairs."""
    if value is None:
        return []
    pairs = [value] if len(value) == 2 and all(isinstance(v, int) for v in value) else value
    try:
        spans = [(int(s), int(e)) for s, e in pairs]
    except (TypeError, ValueError):
        raise CorpusError(f"{where}: {value!r} is not a character span; give [start, end) or a list of "
                          "[start, end) pairs") from None
    if any(s < 0 or e <= s for s, e in spans):
        raise CorpusError(f"{where}: {value!r} holds a span with start < 0 or end <= start")
    return spans


def overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens (character offsets [a, b)) that overlap any span; empty tokens never do."""
    return [b > a and any(a < e and b > s for s, e in spans) for a, b in offsets]


def key_mask(keys: KeysSpec, windows: list[Window], docs: WindowDocs, masks: BatchMasks) -> torch.Tensor:
    """(batch, key_pos) bool: the keys `keys` selects in each window of the batch (padding never)."""
    size = masks.special.shape[1]
    real = torch.arange(size, device=masks.lengths.device)[None, :] < masks.lengths[:, None]
    if keys.segment is not None:
        return getattr(masks, keys.segment) & real
    chosen = torch.zeros_like(real)
    for row, w in enumerate(windows):
        if keys.positions is not None:
            at = [p for p in keys.positions if p < len(w)]
            chosen[row, at] = True
            continue
        if keys.group is not None:
            chosen[row, : len(w)] = torch.tensor(w.groups[docs.groups.index(keys.group)], dtype=torch.bool)
            continue
        value = docs.metadata[keys.column][row] if keys.column is not None else None
        spans = char_spans(keys, docs.texts[row], value, f"document {docs.doc_ids[row]!r}, column {keys.column!r}")
        chosen[row, : len(w)] = torch.tensor(overlapping(w.offsets, spans), dtype=torch.bool)
    return chosen & real
