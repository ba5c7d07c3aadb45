"""Token groups: which tokens of a window belong to each named group of words, for the `groups`
recipe (attention mass between groups, pipeline/recipes/groups.py) and the bias study.

A group ([[groups]] in the job) is defined by any of: a list of words or phrases (`words`), files
of them, one per line (`words_files`, relative to the job file), a regular expression (`regex`),
or the spans marked in the text (`marked`: with `corpus.marks = "brackets"`, WinoBias's
"[The developer] argued with the designer because [he] ..."); `only_marked` keeps a group's
matches that lie inside a marked span. Words and phrases match case-insensitively as whole
words. A token is in a group when its characters overlap one of the group's spans, so a word
split into pieces is in it with all its pieces.

Marks are removed before anything else sees the text: the model, the tokens' offsets and the
words table all work on the text without brackets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import CorpusError, JobError

Span = tuple[int, int]


class GroupSpec(BaseModel):
    """One [[groups]] entry."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    words: list[str] = Field(default_factory=list)
    words_files: list[str] = Field(default_factory=list)
    regex: str | None = None
    marked: bool = False
    only_marked: bool = False

    @model_validator(mode="after")
    def _something(self) -> "GroupSpec":
        if not (self.words or self.words_files or self.regex or self.marked):
            raise ValueError("a group needs words, words_files, regex or marked = true")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits and _ (a column value and a SQL-friendly label)")
        return self


@dataclass
class Matcher:
    """A compiled group."""

    name: str
    pattern: re.Pattern | None  # words, phrases and the regex, one alternation
    marked: bool
    only_marked: bool

    def spans(self, text: str, marks: list[Span]) -> list[Span]:
        found = [m.span() for m in self.pattern.finditer(text) if m.end() > m.start()] if self.pattern else []
        if self.only_marked:
            found = [s for s in found if any(a <= s[0] and s[1] <= b for a, b in marks)]
        return sorted(set(found + (list(marks) if self.marked else [])))


def compile_groups(specs: list[GroupSpec], base_dir: Path, where: str = "job") -> list[Matcher]:
    """The job's groups, their word files read and patterns compiled; JobError naming the group
    for an unreadable file, an empty list or a bad regular expression."""
    out, seen = [], set()
    for i, g in enumerate(specs):
        key = f"{where}: 'groups[{i}]' ({g.name})"
        if g.name in seen:
            raise JobError(f"{key}: the name is used twice; give each group its own name")
        seen.add(g.name)
        words = list(g.words)
        for name in g.words_files:
            path = Path(name).expanduser()
            path = path if path.is_absolute() else base_dir / path
            try:
                words += [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise JobError(f"{key}: words_files: {path} cannot be read ({type(exc).__name__}); give a UTF-8 text "
                               "file with one word or phrase per line") from None
        parts = [r"\b" + r"\s+".join(map(re.escape, w.split())) + r"\b" for w in sorted(set(words), key=len, reverse=True)]
        if g.regex is not None:
            try:
                re.compile(g.regex)
            except re.error as exc:
                raise JobError(f"{key}: regex {g.regex!r} is not a valid regular expression: {exc}") from None
            parts.append(f"(?:{g.regex})")
        if (g.words or g.words_files) and not words and g.regex is None and not g.marked:
            raise JobError(f"{key}: its word list is empty; list words or phrases")
        pattern = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        out.append(Matcher(g.name, pattern, g.marked, g.only_marked))
    return out


def strip_marks(text: str, where: str) -> tuple[str, list[Span]]:
    """The text without [ ] marks, and the marked spans in it. Unbalanced or nested marks are
    refused with the document named: a span cut short would put the wrong tokens in a group."""
    out, spans, start = [], [], None
    at = 0
    for ch in text:
        if ch == "[":
            if start is not None:
                raise CorpusError(f"{where}: a '[' inside a marked span (nested marks) at character {len(out)}; "
                                  "marks are [span] pairs, not nested")
            start = at
        elif ch == "]":
            if start is None:
                raise CorpusError(f"{where}: a ']' without its '[' at character {at}; marks are [span] pairs")
            spans.append((start, at))
            start = None
        else:
            out.append(ch)
            at += 1
    if start is not None:
        raise CorpusError(f"{where}: a '[' that is never closed; marks are [span] pairs")
    return "".join(out), spans


def token_groups(offsets: list[Span], special: list[bool], group_spans: list[list[Span]]) -> list[list[bool]]:
    """For each group, whether each token (its characters) overlaps one of the group's spans;
    special tokens are in no group."""
    out = []
    for spans in group_spans:
        out.append([not sp and b > a and any(a < e and s < b for s, e in spans)
                    for (a, b), sp in zip(offsets, special)])
    return out
