"""Align the tokens of two tokenizations of one text through their character offsets, and pool
attention maps onto the spans they share.

Definitions (one window of each run, tokens in position order):

- A content token covers the characters [char_start, char_end) of the document text; special
  tokens ([CLS], <s>, ...) and tokens that cover no character are not content.
- The common spans are the smallest character spans that are unions of whole content tokens on
  both sides: take every content token of both sides, and join two tokens into one span whenever
  their character ranges overlap (transitively). A span holding tokens of only one side (a
  character only one tokenizer keeps, such as a newline token) is not common: its tokens are left
  out. Two identical tokenizations give one span per content token.
- Special tokens before the first content token form the span `<start>`, those after the last one
  the span `<end>`, when both sides have such tokens ([CLS] and <s> align; so do [SEP] and </s>).
  Special tokens between content tokens are left out.
- Pooling an attention map A (query_pos x key_pos) onto spans, as word pooling does: the
  attention to a span is the sum over its key tokens, the attention from a span the mean over its
  query tokens. Rows are then renormalized to sum to 1 over the common spans; the mass they lost
  (attention on tokens that were left out) is reported as `dropped`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

START, END = -1, -2  # span ids of the special-token spans, before numbering


@dataclass(frozen=True)
class Side:
    """One window's tokens: character offsets and the special flag, in position order."""

    char_start: np.ndarray
    char_end: np.ndarray
    special: np.ndarray

    @classmethod
    def of(cls, starts, ends, special) -> "Side":
        return cls(np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(special, bool))

    def __len__(self) -> int:
        return len(self.char_start)

    @property
    def content(self) -> np.ndarray:
        return ~self.special & (self.char_end > self.char_start)

    def special_ends(self) -> np.ndarray:
        """START for special tokens before the first content token, END after the last, 0 else."""
        out = np.zeros(len(self), np.int64)
        at = np.flatnonzero(self.content)
        first, last = (at[0], at[-1]) if len(at) else (len(self), -1)
        pos = np.arange(len(self))
        out[self.special & (pos < first)] = START
        out[self.special & (pos > last)] = END
        return out


@dataclass(frozen=True)
class Alignment:
    """`span_a[pos]`, `span_b[pos]`: each token's common span (0 .. spans-1), or -1 when left
    out. `bounds`: each span's (char_start, char_end); (-1, -1) for <start>, (-2, -2) for <end>."""

    span_a: np.ndarray
    span_b: np.ndarray
    bounds: np.ndarray  # (spans, 2)

    @property
    def spans(self) -> int:
        return len(self.bounds)

    @property
    def identity(self) -> bool:
        """Both sides are the spans, token for token: pooling would change nothing."""
        n = self.spans
        return (len(self.span_a) == len(self.span_b) == n and (self.span_a == np.arange(n)).all()
                and (self.span_b == np.arange(n)).all())


def align(a: Side, b: Side) -> Alignment:
    """The common spans of two tokenizations of one text (see the module's definitions)."""
    content = [np.flatnonzero(s.content) for s in (a, b)]
    starts = np.concatenate([a.char_start[content[0]], b.char_start[content[1]]])
    ends = np.concatenate([a.char_end[content[0]], b.char_end[content[1]]])
    side = np.concatenate([np.zeros(len(content[0]), int), np.ones(len(content[1]), int)])
    order = np.argsort(starts, kind="stable")
    # A token opens a new group unless it starts before the furthest end seen so far.
    reach = np.maximum.accumulate(ends[order])
    opens = np.ones(len(order), bool)
    opens[1:] = starts[order][1:] >= reach[:-1]
    group = np.empty(len(order), np.int64)
    group[order] = np.cumsum(opens) - 1
    groups = int(opens.sum())
    both = (np.bincount(group[side == 0], minlength=groups) > 0) & (np.bincount(group[side == 1], minlength=groups) > 0)
    number = np.where(both, np.cumsum(both), 0)  # 1-based span number of a common group, 0 if not common
    ends_a, ends_b = a.special_ends(), b.special_ends()
    has_start = bool((ends_a == START).any() and (ends_b == START).any())
    has_end = bool((ends_a == END).any() and (ends_b == END).any())
    shift = int(has_start)
    bounds = [(-1, -1)] * has_start
    lo = np.full(groups, np.iinfo(np.int64).max)
    hi = np.zeros(groups, np.int64)
    np.minimum.at(lo, group, starts)
    np.maximum.at(hi, group, ends)
    bounds += [(int(lo[g]), int(hi[g])) for g in np.flatnonzero(both)]
    bounds += [(-2, -2)] * has_end
    spans = []
    for k, (s, ends_s) in enumerate(((a, ends_a), (b, ends_b))):
        span = np.full(len(s), -1, np.int64)
        n = number[group[side == k]]  # of side k's content tokens, in position order
        span[content[k]] = np.where(n > 0, n - 1 + shift, -1)
        if has_start:
            span[ends_s == START] = 0
        if has_end:
            span[ends_s == END] = len(bounds) - 1
        spans.append(span)
    return Alignment(spans[0], spans[1], np.asarray(bounds, np.int64).reshape(-1, 2))


def pooling(span: np.ndarray, spans: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols): rows (spans x tokens) averages query tokens into their span; cols (tokens x
    spans) sums key tokens into theirs. Tokens left out (span -1) get no weight."""
    tokens = len(span)
    member = np.zeros((spans, tokens))
    kept = span >= 0
    member[span[kept], np.flatnonzero(kept)] = 1.0
    count = member.sum(1, keepdims=True)
    return member / np.maximum(count, 1.0), member.T


def pool(maps: np.ndarray, span: np.ndarray, spans: int) -> tuple[np.ndarray, np.ndarray]:
    """Maps (..., query_pos, key_pos) pooled onto spans and renormalized: (..., span, span), and
    the mass each pooled row had on left-out key tokens (..., span)."""
    rows, cols = pooling(span, spans)
    queried = rows @ maps  # (..., span, key_pos)
    pooled = queried @ cols  # (..., span, span)
    kept = pooled.sum(-1)
    out = pooled / np.where(kept > 0, kept, 1.0)[..., None]
    return out, queried[..., span < 0].sum(-1)
