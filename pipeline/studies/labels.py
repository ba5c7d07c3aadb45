"""The labels file of a grounding study: which generated spans are grounded in their context.

One record per span, as CSV (a header row, then one row per span) or JSON Lines (one object a
line; named .jsonl, .ndjson or .json):

    doc_id                  a generation of the dataset (documents.doc_id)
    label                   1, true or grounded: the span is supported by the context;
                            0, false or ungrounded: it is not (a hallucination). Any case.
    step_start, step_end    optional: the span as generated-token steps [start, end), 0-based
    char_start, char_end    optional: the span as characters [start, end) of
                            documents.generated_text: the steps whose tokens overlap them
    (no span: the whole generation; a row gives one kind of span or none; other columns are
    ignored)

The study's detector takes "not grounded" as the positive class: its score is the probability
that a span is ungrounded, and AUROC says how well that score finds ungrounded spans.

Every problem is one ReadError line naming the file, the line and the value.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ReadError

LABELS = {"1": 1, "true": 1, "grounded": 1, "0": 0, "false": 0, "ungrounded": 0}  # -> grounded
SPANS = {"step": ("step_start", "step_end"), "char": ("char_start", "char_end")}
REQUIRED = ("doc_id", "label")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
UNITS = ["doc_id", "step_start", "step_end", "grounded", "char_start", "char_end", "source"]

Record = tuple[str, dict[str, str]]  # (where: "line 4", {column: value as text, "" if not given})


def read_labels(path: str | Path) -> list[Record]:
    """The records of a labels file, every value as text ("" where not given), with the line
    each came from. Checks the columns, not the values (see `resolve_spans`)."""
    path = Path(path)
    if not path.is_file():
        raise ReadError(f"labels file {path} {'is not a file' if path.exists() else 'does not exist'}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns, records = _read_csv(path)
    elif suffix in JSON_SUFFIXES:
        columns, records = _read_jsonl(path)
    else:
        raise ReadError(f"labels file {path}: cannot tell its format from its name; name it .csv (a header "
                        "row, then one row per span) or .jsonl (JSON Lines: one object per line)")
    _check_columns(path, columns)
    if not records:
        raise ReadError(f"labels file {path} has no rows; give one row per span: doc_id, label")
    return records


def _read_csv(path: Path) -> tuple[list[str], list[Record]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM as spreadsheets write it
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            records = []
            for row in reader:
                if None in row:
                    raise ReadError(f"labels file {path} line {reader.line_num}: {len(columns) + len(row[None])} "
                                    f"fields, the header has {len(columns)}")
                records.append((f"line {reader.line_num}",
                                {k.strip(): (v or "").strip() for k, v in row.items()}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReadError(f"labels file {path} cannot be read as UTF-8 CSV: {exc}") from None
    return columns, records


def _read_jsonl(path: Path) -> tuple[list[str], list[Record]]:
    columns: dict[str, None] = {}
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReadError(f"labels file {path} cannot be read as UTF-8: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ReadError(f"labels file {path} line {number}: not JSON ({exc.args[0]})") from None
        if not isinstance(obj, dict):
            raise ReadError(f"labels file {path} line {number}: not a JSON object (JSON Lines: one object "
                            "such as {\"doc_id\": \"d1\", \"label\": 1} per line)")
        columns.update(dict.fromkeys(obj))
        records.append((f"line {number}", {k: _text(v) for k, v in obj.items()}))
    return list(columns), records


def _text(value) -> str:
    """A JSON value as the text a CSV cell would hold: null -> "", true -> "true", 3 -> "3"."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.strip() if isinstance(value, str) else json.dumps(value)


def _check_columns(path: Path, columns: list[str]) -> None:
    have = ", ".join(columns) or "none"
    for name in REQUIRED:
        if name not in columns:
            raise ReadError(f"labels file {path} has no column {name!r} (columns: {have}); it needs doc_id and "
                            "label, and optionally step_start/step_end or char_start/char_end")
    for start, end in SPANS.values():
        if (start in columns) != (end in columns):
            one, other = (start, end) if start in columns else (end, start)
            raise ReadError(f"labels file {path} has column {one!r} without {other!r}; a span needs both")


def resolve_spans(path: str | Path, records: list[Record], docs: pd.DataFrame, generations: pd.DataFrame,
                  texts: pd.Series, dataset: str) -> pd.DataFrame:
    """The spans of `records` as generated steps: one row per record with doc_id, step_start,
    step_end (half-open), grounded (1 or 0), char_start/char_end (when given) and source
    (its line). `docs`: steps per generation (index doc_id); `generations`: token offsets."""
    char_docs = {v["doc_id"] for _, v in records if any(v.get(c) for c in SPANS["char"])}
    tokens = {doc: (part["char_start"].to_numpy(), part["char_end"].to_numpy())
              for doc, part in generations[generations["doc_id"].isin(char_docs)]
              .sort_values(["doc_id", "step"]).groupby("doc_id", sort=False)}
    rows = [_resolve(_Where(path, where), values, docs, tokens, texts, dataset) for where, values in records]
    return pd.DataFrame(rows, columns=UNITS).astype({"char_start": "Int64", "char_end": "Int64"})


class _Where:
    """Builds the one-line errors of a record: 'labels file F line N: what'."""

    def __init__(self, path: str | Path, where: str):
        self.path, self.where = path, where

    def __str__(self) -> str:
        return self.where

    def error(self, what: str) -> ReadError:
        return ReadError(f"labels file {self.path} {self.where}: {what}")


def _resolve(at: _Where, values: dict[str, str], docs: pd.DataFrame, tokens: dict, texts: pd.Series,
             dataset: str) -> list:
    doc = values.get("doc_id", "")
    if not doc:
        raise at.error("doc_id is empty")
    if doc not in docs.index:
        why = "generated no tokens" if doc in texts.index else "is not a generation there"
        raise at.error(f"doc_id {doc!r} {why} ({dataset} has {len(docs)} generations, e.g. {docs.index[0]!r})")
    grounded = _label(at, values.get("label", ""))
    kinds = [kind for kind, columns in SPANS.items() if any(values.get(c) for c in columns)]
    if len(kinds) > 1:
        raise at.error("gives both step_start/step_end and char_start/char_end; give one kind of span")
    steps = int(docs.at[doc, "steps"])
    char = (None, None)
    if not kinds:
        start, end = 0, steps
    elif kinds[0] == "step":
        start, end = _bounds(at, values, SPANS["step"], steps, f"{doc!r} generated {steps} tokens: steps 0:{steps}")
    else:
        length = len(texts.get(doc) or "")
        char = _bounds(at, values, SPANS["char"], length, f"the generated text of {doc!r} has {length} characters")
        found = char_span_steps(*tokens[doc], *char)
        if found is None:
            raise at.error(f"characters {char[0]}:{char[1]} of {doc!r} overlap no generated token")
        start, end = found
    return [doc, start, end, grounded, char[0], char[1], str(at)]


def _label(at: _Where, value: str) -> int:
    if value.lower() not in LABELS:
        raise at.error(f"label {value!r} is not one of 1, true, grounded (the span is grounded) or "
                       "0, false, ungrounded (it is not)")
    return LABELS[value.lower()]


def _bounds(at: _Where, values: dict[str, str], columns: tuple[str, str], limit: int, what: str) -> tuple[int, int]:
    """[start, end) from two columns: whole numbers with 0 <= start < end <= limit."""
    bounds = []
    for name in columns:
        value = values.get(name, "")
        if not value:
            raise at.error(f"{name} is empty while {columns[0] if name == columns[1] else columns[1]} is given; "
                           "a span needs both")
        try:
            bounds.append(int(value))
        except ValueError:
            raise at.error(f"{name} {value!r} is not a whole number") from None
    start, end = bounds
    if not 0 <= start < end <= limit:
        raise at.error(f"span {columns[0]}={start}, {columns[1]}={end} is not a non-empty range inside the "
                       f"generation ({what})")
    return start, end


def char_span_steps(token_start: np.ndarray, token_end: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """The steps [first, last + 1) of the generated tokens whose characters overlap characters
    [start, end) of the generated text, or None when none does. Token s covers characters
    [token_start[s], token_end[s]); it overlaps when token_start < end and token_end > start.
    Tokens of no characters (special tokens, bytes of a character a later token completes) overlap
    nothing, but count when they lie between two that do."""
    overlap = np.flatnonzero((token_start < end) & (token_end > start) & (token_end > token_start))
    if not len(overlap):
        return None
    return int(overlap[0]), int(overlap[-1]) + 1
