"""Tokenize documents into model windows and group them into padded batches.

A document longer than the window is split into overlapping windows by the tokenizer itself
(`return_overflowing_tokens` with `stride` tokens of overlap); nothing is silently truncated.
A source/target pair for an encoder-decoder model is one window with a `Target` (pipeline/pairs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .wordpieces import has_word_ids, window_words


@dataclass
class Target:
    """The decoder's side of a source/target pair: its teacher-forced input ids (the model's own
    shift right of the tokenized target), each with its span in the target text."""

    input_ids: list[int]
    offsets: list[tuple[int, int]]  # (0, 0) for the decoder start token
    special: list[bool]
    words: list[int] | None = None  # word index of each token (pipeline/wordpieces.py)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Window:
    doc_index: int  # index of the document within its shard
    window: int  # 0, 1, ... within the document
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the document text
    special: list[bool]
    target: Target | None = None  # encoder-decoder pairs: the decoder's input
    words: list[int] | None = None  # word index of each token (pipeline/wordpieces.py)
    groups: list[list[bool]] | None = None  # per [[groups]] entry, whether each token is in it (pipeline/groups.py)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def size(self) -> int:
        """Padded length the window costs in a batch: its longer side."""
        return max(len(self), len(self.target) if self.target is not None else 0)


def tokenize(tokenizer, texts: list[str], max_length: int, stride: int,
             chunk: int = 512) -> list[Window]:
    """Windows of every non-empty text, in document order."""
    windows: list[Window] = []
    todo = [i for i, t in enumerate(texts) if t.strip()]
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        return_special_tokens_mask=True, padding=False)
        previous, counter = None, 0
        by_ids = has_word_ids(tokenizer)
        for row, sample in enumerate(enc["overflow_to_sample_mapping"]):
            counter = counter + 1 if sample == previous else 0
            previous = sample
            offsets = [tuple(o) for o in enc["offset_mapping"][row]]
            special = [bool(s) for s in enc["special_tokens_mask"][row]]
            words = window_words(tokenizer, enc.word_ids(row) if by_ids else None, enc["input_ids"][row],
                                 offsets, special)
            windows.append(Window(idx[sample], counter, enc["input_ids"][row], offsets, special, words=words))
    return windows


def make_batches(windows: list[Window], batch_tokens: int) -> list[list[int]]:
    """Indices of windows per batch: longest first, similar lengths together, and at most
    `batch_tokens` padded tokens per batch (a single longer window still gets its own batch)."""
    order = sorted(range(len(windows)), key=lambda i: -windows[i].size)
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so the batch's first window sets its padded length.
        if batches and (len(batches[-1]) + 1) * windows[batches[-1][0]].size <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def collate(windows: list[Window] | list[Target], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (batch, pos) input_ids and attention_mask (of windows, or of their targets)."""
    size = max(len(w) for w in windows)
    ids = torch.full((len(windows), size), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), size), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = torch.tensor(w.input_ids)
        mask[row, : len(w)] = 1
    return ids, mask
