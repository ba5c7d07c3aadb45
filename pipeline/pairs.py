"""Source/target pairs for encoder-decoder models (T5, BART, Marian, mBART, Pegasus, ...).

With `[corpus] target_column`, each document is a pair: the encoder reads the source text and
the decoder runs teacher-forced over the target, so one forward pass calls every attention of
the model: encoder self, decoder self (causal) and decoder cross (target queries, source keys).
No generation happens here.

The decoder's input is the model's own shift right of the tokenized target (its
`shift_tokens_right` or `_shift_right`): the decoder start token, then the target's tokens but
the last. Position t of the target side is what the decoder reads at step t, and the tokens
table labels it so. A pair is never split into windows (a window of the source would need the
matching piece of the target, which nothing defines): a side longer than the window is refused.
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable

import torch

from .errors import CorpusError, JobError, ModelError
from .windows import Target, Window
from .wordpieces import has_word_ids, window_words

CHUNK = 512  # pairs tokenized together


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def check_pairs(job, lm) -> dict:
    """Refuse `corpus.target_column` for a model without a decoder over an encoder; the
    provenance entries of a pair run (what the fused backend leaves to the torch path)."""
    column = job.corpus.target_column
    if column is None:
        return {}
    if not is_encoder_decoder(lm.model):
        raise JobError(f"corpus.target_column ({column!r}) needs an encoder-decoder model (T5, BART, Marian, "
                       f"...); {lm.name} ({type(lm.model).__name__}) has no cross-attention: remove target_column")
    info = {"target_column": column}
    if lm.kernels is not None:
        info["attention_fallback"] = ("cross-attention layers run the torch recipes (the fused kernels take one "
                                      "length per window; a cross layer's query and key lengths differ)")
    return info


def decoder_start(model: torch.nn.Module) -> int:
    """The decoder start token id, from config.json or generation_config.json (written back to
    the config, where the model's own shift looks for it)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        if start is None:
            raise ModelError(f"{type(model).__name__}: neither config.json nor generation_config.json sets "
                             "decoder_start_token_id, the token the decoder starts the target with (T5: the pad "
                             "token's id, 0; BART: 2); add it to config.json")
        model.config.decoder_start_token_id = start
    return start


def shift_function(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own shift right of (batch, pos) target ids into decoder input ids."""
    config = model.config
    pad, start = config.pad_token_id, decoder_start(model)
    shift = getattr(sys.modules[type(model).__module__], "shift_tokens_right", None)
    if shift is not None and pad is not None:
        if "decoder_start_token_id" in inspect.signature(shift).parameters:
            return lambda ids: shift(ids, pad, start)
        return lambda ids: shift(ids, pad)  # mBART: the last token (the language code) starts the decoder
    if hasattr(model, "_shift_right"):  # T5 and its kin
        return model._shift_right
    raise ModelError(f"{type(model).__name__}: no shift_tokens_right or _shift_right to make the decoder's input "
                     "from the target; this encoder-decoder is not supported")


def decoder_inputs(model: torch.nn.Module, labels: list[list[int]]) -> list[list[int]]:
    """Each target's decoder input ids (as long as the target), shifted by the model itself."""
    if not labels:
        return []
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = torch.full((len(labels), max(len(x) for x in labels)), pad, dtype=torch.long)
    for row, ids in enumerate(labels):
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    try:
        shifted = shift_function(model)(batch)
    except ValueError as exc:  # transformers' own "config.X has to be defined"
        raise ModelError(f"{type(model).__name__}: cannot make the decoder's input: {exc}") from None
    return [shifted[row, : len(ids)].tolist() for row, ids in enumerate(labels)]


def _target(decoder: list[int], labels: list[int], offsets: list, special: list, special_ids: set,
            tok=None, word_ids: list | None = None) -> Target:
    """Position t reads label t-1 (shifted right): its span (and word); the start token (and any
    token the model's shift put elsewhere) has none, and is a word of its own."""
    spans, flags, wids = [], [], []
    for t, token in enumerate(decoder):
        if t > 0 and labels[t - 1] == token:
            spans.append(tuple(offsets[t - 1]))
            flags.append(bool(special[t - 1]))
            wids.append(None if word_ids is None else word_ids[t - 1])
        else:
            spans.append((0, 0))
            flags.append(token in special_ids or t == 0)
            wids.append(None)
    words = None if tok is None else window_words(tok, None if word_ids is None else wids, decoder, spans, flags)
    return Target(decoder, spans, flags, words)


def _too_long(name: str, side: str, n: int, window: int, lm) -> CorpusError:
    return CorpusError(f"document {name!r}: its {side} has {n} tokens, more than the window's {window}; "
                       "source/target pairs are not split into windows: shorten it, or raise model.max_length "
                       f"(up to {lm.max_length} for {lm.name})")


def tokenize_pairs(lm, sources: list[str], targets: list[str], window: int, names: list[str]) -> list[Window]:
    """One window per pair with a non-empty source, in document order; `names` (doc ids) name a
    pair whose source or target does not fit the window."""
    tok = lm.tokenizer
    out: list[Window] = []
    todo = [i for i, text in enumerate(sources) if text.strip()]
    options = dict(truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True, padding=False)
    for start in range(0, len(todo), CHUNK):
        idx = todo[start:start + CHUNK]
        src = tok([sources[i] for i in idx], **options)
        tgt = tok(text_target=[targets[i] for i in idx], **options)
        for row, i in enumerate(idx):
            for side, enc in (("source", src), ("target", tgt)):
                if len(enc["input_ids"][row]) > window:
                    raise _too_long(names[i], side, len(enc["input_ids"][row]), window, lm)
            if not tgt["input_ids"][row]:
                raise CorpusError(f"document {names[i]!r}: its target has no tokens, so the decoder has nothing "
                                  "to read; give it a target text")
        decoder = decoder_inputs(lm.model, tgt["input_ids"])
        special_ids = set(tok.all_special_ids)
        by_ids = has_word_ids(tok)
        for row, i in enumerate(idx):
            target = _target(decoder[row], tgt["input_ids"][row], tgt["offset_mapping"][row],
                             tgt["special_tokens_mask"][row], special_ids, tok,
                             tgt.word_ids(row) if by_ids else None)
            offsets = [tuple(o) for o in src["offset_mapping"][row]]
            special = [bool(s) for s in src["special_tokens_mask"][row]]
            words = window_words(tok, src.word_ids(row) if by_ids else None, src["input_ids"][row], offsets, special)
            out.append(Window(i, 0, src["input_ids"][row], offsets, special, target, words))
    return out
