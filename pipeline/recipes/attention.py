"""What a recipe sees: one layer's attention probabilities plus the batch's masks.

Dimension names are the same everywhere: batch, head, query_pos, key_pos. A recipe returns a
dict of 1-D column tensors (still on the device); the writer adds doc_id, window, layer and the
recipe's name and parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

HEAD_MEAN = -1  # the `head` value of rows computed on the mean over heads


@dataclass
class BatchMasks:
    """Per-batch token facts, shared by every layer and recipe.

    The fields describe the query side. Self-attention's keys are the same tokens; for
    cross-attention (a decoder's queries on the encoder's output) `keys` holds the key side's
    masks (the source), whose length differs from the queries' (the target)."""

    lengths: torch.Tensor  # (batch,) real tokens per window; the rest is right padding
    special: torch.Tensor  # (batch, pos) bool: [CLS], [SEP], <s>, ... (tokenizer's special mask)
    sep: torch.Tensor  # (batch, pos) bool: separator / end-of-sequence tokens
    punct: torch.Tensor  # (batch, pos) bool: tokens made only of punctuation
    causal: bool
    keys: "BatchMasks | None" = None  # cross-attention: the key side; None: the keys are the queries
    words: "WordPooling | None" = None  # the windows' words, when a recipe runs at level "word"
    groups: torch.Tensor | None = None  # (batch, group, pos) bool: the job's token groups (groups recipe)
    # A block of query rows (BatchMasks.queries): the query side holds positions offset..offset+size
    # of the windows, `whole` is the windows' own masks (self-attention's key side).
    offset: int = 0
    whole: "BatchMasks | None" = None

    def rows(self, lo: int, hi: int) -> "BatchMasks":
        """The masks of windows lo..hi."""
        if self.whole is not None:
            return self.whole.rows(lo, hi).queries(self.offset, self.offset + self.size)
        return BatchMasks(self.lengths[lo:hi], self.special[lo:hi], self.sep[lo:hi], self.punct[lo:hi],
                          self.causal, None if self.keys is None else self.keys.rows(lo, hi),
                          None if self.words is None else self.words.rows(lo, hi),
                          None if self.groups is None else self.groups[lo:hi])

    def queries(self, q0: int, q1: int, keys: int | None = None) -> "BatchMasks":
        """The masks of query rows q0..q1 of these windows: what a recipe sees of one block of a
        long window. Self-attention's keys are the windows' positions 0..keys (all of them by
        default; a causal block's queries see none past q1). Words and groups need whole windows
        and are left out."""
        if self.whole is not None:
            raise ValueError("queries() of a block of queries")
        whole = self if keys is None or self.keys is not None else BatchMasks(
            self.lengths, self.special[:, :keys], self.sep[:, :keys], self.punct[:, :keys], self.causal)
        return BatchMasks(self.lengths, self.special[:, q0:q1], self.sep[:, q0:q1], self.punct[:, q0:q1],
                          self.causal, self.keys, offset=q0, whole=whole)

    @cached_property
    def word_level(self) -> "BatchMasks":
        """The same facts about words: their counts, which words are special, separators or
        punctuation (all their pieces are), the causal mask on word indices (a query word sees
        key words up to itself); cross-attention: target words over source words."""
        if self.words is None or (self.keys is not None and self.keys.words is None):
            raise ValueError("word-level masks need the batch's words (batch_masks(..., words=True))")
        masks = self.words.masks
        return masks if self.keys is None else replace(masks, causal=False, keys=self.keys.words.masks)

    @property
    def cross(self) -> bool:
        return self.keys is not None

    @property
    def key_side(self) -> "BatchMasks":
        """The keys' masks: `keys` for cross-attention, the windows' own for self-attention."""
        return self.keys if self.keys is not None else self.whole if self.whole is not None else self

    @property
    def size(self) -> int:  # query positions
        return self.special.shape[1]

    @cached_property
    def positions(self) -> torch.Tensor:  # (query_pos,): the queries' positions in their windows
        return torch.arange(self.offset, self.offset + self.size, device=self.lengths.device)

    @property
    def key_positions(self) -> torch.Tensor:  # (key_pos,)
        return self.key_side.positions

    @cached_property
    def token_valid(self) -> torch.Tensor:  # (batch, query_pos)
        return self.positions[None, :] < self.lengths[:, None]

    @cached_property
    def pair_valid(self) -> torch.Tensor:  # (batch, 1, query_pos, key_pos)
        valid = self.token_valid[:, None, :, None] & self.key_side.token_valid[:, None, None, :]
        if self.causal and not self.cross:
            valid = valid & (self.key_positions[None, :] <= self.positions[:, None])
        return valid


@dataclass
class WordPooling:
    """Which word each token of a batch belongs to, as a (batch, word, pos) 0/1 matrix `total`
    (padding positions belong to no word), and the word-level masks."""

    total: torch.Tensor  # (batch, word, pos) float32
    masks: BatchMasks  # word-level: lengths are word counts, flags per word

    def rows(self, lo: int, hi: int) -> "WordPooling":
        return WordPooling(self.total[lo:hi], self.masks.rows(lo, hi))

    @cached_property
    def average(self) -> torch.Tensor:  # (batch, word, pos): each word's row averages its pieces
        return self.total / self.total.sum(-1, keepdim=True).clamp_min(1.0)


class LayerAttention:
    """One layer's attention for a batch, handed to every recipe, then dropped.

    Built from the probabilities, or from the layer's inputs (`pipeline.capture.LayerInputs`:
    q, k, mask, scaling), in which case the probabilities are computed on first use only. With
    `rows` (lo, hi) it covers only those windows of the inputs' batch, and `masks` are theirs.
    """

    def __init__(self, probs: torch.Tensor | None, layer: int, masks: BatchMasks, inputs=None,
                 rows: tuple[int, int] | None = None):
        self._probs, self.layer, self.masks, self.inputs, self.rows = probs, layer, masks, inputs, rows

    @cached_property
    def probs(self) -> torch.Tensor:  # (batch, head, query_pos, key_pos), as the model computed it
        if self._probs is not None:
            return self._probs
        if self.rows is None and self.masks.whole is None:
            return self.inputs.probs
        return self.inputs.probs_rows(*self._span)

    @property
    def _span(self) -> tuple[int, int, int, int, int]:
        """(first window, last window + 1, first query, last query + 1, keys) of the inputs."""
        m = self.masks
        lo, hi = self.rows or (0, self.inputs.query.shape[0])
        return lo, hi, m.offset, m.offset + m.size, m.key_side.size

    def entropy(self) -> torch.Tensor:
        """(batch, head, query_pos) each query's entropy in nats over `clean`. Computed with the
        probabilities from the scores (capture.LayerInputs.probs_entropy_rows) when they are not
        formed yet, which needs no log of any weight; else -sum p log p with the log clamped at
        the smallest normal float (exact zeros, padding and the future, give 0 * -87.3)."""
        if (self._probs is None and self.inputs is not None and self.inputs.given is None
                and "probs" not in self.__dict__):
            self.__dict__["probs"], entropy = self.inputs.probs_entropy_rows(*self._span)
            return entropy
        p = self.clean
        return -torch.clamp_min(p, torch.finfo(torch.float32).tiny).log_().mul_(p).sum(-1)

    @cached_property
    def clean(self) -> torch.Tensor:
        """Probabilities in float32, zero on padded keys and (causal) future keys.

        Probabilities the capture produced come from a softmax over scores plus the model's
        additive mask, whose masked entries are the dtype's minimum: exp() makes them exactly 0,
        so they need no copy (their padded query rows stay, and every recipe drops those rows).
        Probabilities handed in from elsewhere are masked explicitly, garbage or NaN included."""
        if self.inputs is not None:
            return self.probs.float()
        return self.probs.float().masked_fill(~self.masks.pair_valid, 0.0)

    @cached_property
    def head_mean(self) -> torch.Tensor:  # (batch, 1, query_pos, key_pos)
        return self.clean.mean(dim=1, keepdim=True)

    def select(self, per_head: bool) -> torch.Tensor:
        return self.clean if per_head else self.head_mean

    @cached_property
    def words(self) -> "LayerAttention":
        """This layer's attention between words (Clark et al. 2019): attention to a word is the
        sum over its pieces, attention from a word the mean over its pieces, so every real word's
        row still sums to one. P_word = A_q @ P @ S_k^T per window and head, with A_q averaging
        the query side's pieces and S_k summing the key side's; masks are `masks.word_level`."""
        m = self.masks
        word_masks = m.word_level  # raises when the batch has no words
        total = m.key_side.words.total.transpose(1, 2)[:, None]  # (batch, 1, key_pos, key word)
        pooled = (m.words.average[:, None] @ self.clean) @ total  # (batch, head, query word, key word)
        return LayerAttention(pooled, self.layer, word_masks)


def edge_columns(keep: torch.Tensor, key_pos: torch.Tensor, weight: torch.Tensor,
                 per_head: bool) -> dict[str, torch.Tensor]:
    """Rows for the entries of `keep` (batch, head, query_pos, j), with key position and weight
    taken from the same-shaped `key_pos` and `weight`."""
    b, h, q, j = keep.nonzero(as_tuple=True)
    head = h if per_head else torch.full_like(h, HEAD_MEAN)
    return {"batch_index": b, "head": head, "query_pos": q,
            "key_pos": key_pos[b, h, q, j], "weight": weight[b, h, q, j].float()}
