"""Prompts: each document's text (and context) through the job's template and the tokenizer's
chat template, tokenized, with the segment of every token.

The segments are what the grounding table measures attention on: `context` (the
corpus.context_column text), `question` (the corpus text), `system` (the job's system message),
and `template` for everything else the model reads (the template's own words, chat markup,
special tokens). Spans are tracked through the formatting, so a context that happens to repeat
words of the template is still found exactly.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..errors import CorpusError, JobError
from ..windows import Window
from ..wordpieces import has_word_ids, window_words

SEGMENTS = ("system", "context", "question", "template")


@dataclass
class Prompt:
    """One document's prompt: the Window the recipes see (its offsets point into `text`) and the
    segment of each token."""

    text: str
    window: Window
    segments: list[str]

    def __len__(self) -> int:
        return len(self.window)


def fill_template(template: str | None, text: str, context: str | None) -> tuple[str, dict[str, tuple[int, int]]]:
    """The user message and the character span of each placed field ({text} -> "question")."""
    if template is None:
        return text, {"question": (0, len(text))}
    out, spans = [], {}
    at = 0
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        at += len(literal)
        if name is None:
            continue
        value = text if name == "text" else (context or "")
        spans["question" if name == "text" else "context"] = (at, at + len(value))
        out.append(value)
        at += len(value)
    return "".join(out), spans


def uses_chat_template(tokenizer, wanted: bool) -> bool:
    return wanted and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, user: str, spans: dict[str, tuple[int, int]], system: str | None, chat: bool,
           name: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """The prompt text the model reads and the spans of its segments in it."""
    if not chat:
        head = f"{system}\n\n" if system else ""
        moved = {k: (a + len(head), b + len(head)) for k, (a, b) in spans.items()}
        if system:
            moved["system"] = (0, len(system))
        return head + user, moved
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    at = text.rfind(user)
    if at < 0:
        raise JobError(f"document {name!r}: the tokenizer's chat template changes the message text (it is not "
                       "found verbatim in the rendered prompt), so segments cannot be placed; set "
                       "generate.chat_template = false")
    found = {k: (a + at, b + at) for k, (a, b) in spans.items()}
    if system:
        s = text.find(system)
        if s >= 0:
            found["system"] = (s, s + len(system))
    return text, found


def segment_of(start: int, end: int, spans: dict[str, tuple[int, int]]) -> str:
    """The segment most of a token's characters fall in (a byte-level token such as "ĠThe" carries
    the space before a context's first word); tokens without characters (special tokens, chat
    markup) and those outside every span are the template's."""
    best, most = "template", 0
    for name in ("context", "question", "system"):
        a, b = spans.get(name, (0, 0))
        overlap = min(end, b) - max(start, a)
        if overlap > most:
            best, most = name, overlap
    return best


def build_prompts(tokenizer, texts: list[str], contexts: list[str] | None, names: list[str], gen,
                  window: int, max_new_tokens: int) -> list[Prompt | None]:
    """Each document's Prompt; None for an empty text (such a document has no other rows). A
    prompt that leaves no room for max_new_tokens in the model's window is refused."""
    chat = uses_chat_template(tokenizer, gen.chat_template)
    out: list[Prompt | None] = []
    todo: list[tuple[int, str, dict]] = []
    for i, text in enumerate(texts):
        if not text.strip():
            out.append(None)
            continue
        user, spans = fill_template(gen.template, text, None if contexts is None else contexts[i])
        rendered, where = render(tokenizer, user, spans, gen.system, chat, names[i])
        todo.append((i, rendered, where))
        out.append(None)
    if not todo:
        return out
    enc = tokenizer([t for _, t, _ in todo], add_special_tokens=not chat, return_offsets_mapping=True,
                    return_special_tokens_mask=True, truncation=False, padding=False)
    by_ids = has_word_ids(tokenizer)
    for row, (i, rendered, where) in enumerate(todo):
        ids = enc["input_ids"][row]
        if len(ids) + max_new_tokens > window:
            raise CorpusError(f"document {names[i]!r}: its prompt has {len(ids)} tokens, and with "
                              f"generate.max_new_tokens ({max_new_tokens}) that passes the window of {window} tokens; "
                              "shorten it, lower max_new_tokens, or raise model.max_length")
        offsets = [tuple(o) for o in enc["offset_mapping"][row]]
        special = [bool(s) for s in enc["special_tokens_mask"][row]]
        words = window_words(tokenizer, enc.word_ids(row) if by_ids else None, ids, offsets, special)
        segments = [segment_of(a, b, where) for a, b in offsets]
        out[i] = Prompt(rendered, Window(i, 0, ids, offsets, special, None, words), segments)
    return out
