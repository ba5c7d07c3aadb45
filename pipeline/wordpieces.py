"""Words of a window: which tokens (pieces) form one word. The one place that decides it, for the
`tokens.word_index` column, the `words` table, word-level recipes (`level = "word"`) and the
word-merged plots.

- A fast tokenizer with a pre-tokenizer says it itself (`encoding.word_ids()`): consecutive
  pieces with the same word id are one word.
- Otherwise (slow tokenizers, and fast ones without a pre-tokenizer, whose word ids would make
  the whole text one word) the character offsets decide: pieces whose spans touch without a gap
  form a word; punctuation at a word's edge stays on its own, punctuation inside a word (don't,
  well-known, 3.5) stays in it.
- Special tokens ([CLS], [SEP], <s>, the decoder's start token) are each a word of their own, so
  every token has a word and word-level maps keep them as rows and columns.
- Word indices count from 0 in each window (and side): a window that starts inside a word
  (overflow windows share `stride` tokens) has that partial word as its own word.
"""

from __future__ import annotations

_MARKERS = ("##", "Ġ", "▁", "Ċ")  # WordPiece continuation, byte-level BPE and SentencePiece spaces


def clean_token(token: str) -> str:
    for marker in _MARKERS:
        if token.startswith(marker) and len(token) > len(marker):
            return token[len(marker):]
    return token


def is_punct(token: str) -> bool:
    text = clean_token(token)
    return bool(text) and not any(ch.isalnum() for ch in text)


def offset_words(tokens: list[str], starts: list[int], ends: list[int], special: list[bool]) -> list[int]:
    """Word index of each token from character offsets (see the module docstring)."""
    n = len(tokens)

    def touches(i: int) -> bool:  # token i continues token i - 1 with no gap in the text
        return (i > 0 and not special[i] and not special[i - 1] and starts[i] == ends[i - 1]
                and ends[i] > starts[i])

    words: list[int] = []
    size = 0  # pieces in the current word
    for i in range(n):
        joined = touches(i)
        if joined and is_punct(tokens[i]):  # punctuation joins only if a letter/digit piece follows
            joined = i + 1 < n and touches(i + 1) and not is_punct(tokens[i + 1])
        elif joined and is_punct(tokens[i - 1]):
            joined = size > 1  # after inner punctuation (don't), not after leading punctuation
        if joined and words:
            words.append(words[-1])
            size += 1
        else:
            words.append(words[-1] + 1 if words else 0)
            size = 1
    return words


def id_words(word_ids: list[int | None], special: list[bool]) -> list[int]:
    """Word index of each token from a fast tokenizer's word ids, renumbered from 0 in the window:
    a run of pieces with the same id is a word; a special token (or one without an id) is its own."""
    words: list[int] = []
    for i, wid in enumerate(word_ids):
        alone = wid is None or special[i]
        same = (not alone and i > 0 and word_ids[i - 1] == wid and not special[i - 1])
        words.append(words[-1] if same else (words[-1] + 1 if words else 0))
    return words


def has_word_ids(tokenizer) -> bool:
    """Whether the tokenizer's own word ids split words: a fast tokenizer with a pre-tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return bool(getattr(tokenizer, "is_fast", False)) and backend is not None and backend.pre_tokenizer is not None


def window_words(tokenizer, word_ids: list[int | None] | None, input_ids: list[int],
                 offsets: list[tuple[int, int]], special: list[bool]) -> list[int]:
    """Word index of each token of a window: from `word_ids` (None unless `has_word_ids`), else offsets."""
    if word_ids is not None:
        return id_words(word_ids, special)
    return offset_words(tokenizer.convert_ids_to_tokens(input_ids), [s for s, _ in offsets],
                        [e for _, e in offsets], special)


def word_spans(words: list[int], offsets: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(char_start, char_end, first_position, last_position) of each word, in word order. A word's
    span runs from its first piece's start to its last piece's end (0, 0 for special tokens)."""
    spans: list[list[int]] = []
    for pos, (w, (start, end)) in enumerate(zip(words, offsets)):
        if w == len(spans):
            spans.append([start, end, pos, pos])
        else:
            span = spans[w]
            span[1], span[3] = max(span[1], end), pos
    return [tuple(s) for s in spans]
