"""The rules of [[interventions]] and [effects], checked when the job is read (before any model
loads), each refusal one line naming the key and what is valid. Checks that need the model
(layer and head numbers, target tokens) are in `check_against_model`, run when it has loaded."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import JobError

if TYPE_CHECKING:
    from ..job import InterventionSpec, JobSpec, KeysSpec

SEGMENTS = ("special", "sep", "punct")
GENERATE_SEGMENTS = ("context", "question", "system", "template", "special")  # of a prompt (generate/prompts.py)
KEY_WAYS = ("positions", "spans", "regex", "segment", "column", "group")


def check_interventions(job: "JobSpec", source: str) -> None:
    """Every [[interventions]] entry and [effects]; nothing to check when there are none."""
    if not job.interventions:
        if job.effects.logits or job.effects.targets:
            raise JobError(f"{source}: '[effects]' is set but the job has no [[interventions]]; add one or "
                           "remove [effects]")
        return
    if job.corpus.target_column is not None:
        raise JobError(f"{source}: [[interventions]] apply to single-stack forward runs; corpus.target_column "
                       "(encoder-decoder pairs) is not supported with them yet")
    if job.model.factory is not None:
        raise JobError(f"{source}: [[interventions]] need a transformers model (the capture seam); "
                       "model.factory models are not supported")
    from ..recipes import RECIPES

    backward = [r["name"] for r in job.recipes if getattr(RECIPES[r["name"]], "gradients", False)]
    if backward:
        raise JobError(f"{source}: recipe {backward[0]!r} needs a backward pass, which [[interventions]] do not "
                       "measure against yet; run them in separate jobs")
    labels: dict[str, int] = {}
    for i, spec in enumerate(job.interventions):
        where = f"{source}: 'interventions[{i}]"
        _check_one(spec, where, job.corpus.metadata_columns, [g.name for g in getattr(job, "groups", [])])
        if job.generate is not None:
            _check_generate(spec, where)
        label = intervention_label(spec, i)
        if label in labels:
            raise JobError(f"{where}.label' {label!r} is also interventions[{labels[label]}]'s; labels name the "
                           "rows of the effects table, so each must be unique")
        labels[label] = i
    if job.generate is None:
        bad = [(i, s.keys or s.except_keys) for i, s in enumerate(job.interventions)]
        bad = [(i, k.segment) for i, k in bad if k is not None and k.segment in set(GENERATE_SEGMENTS) - set(SEGMENTS)]
        if bad:
            raise JobError(f"{source}: 'interventions[{bad[0][0]}]' segment {bad[0][1]!r} is a prompt segment of "
                           f"generate runs; forward runs have {', '.join(SEGMENTS)}")
    elif job.effects.logits or job.effects.targets:
        raise JobError(f"{source}: [effects] measures forward runs; a generate run records the generated text")
    _check_effects(job, source)


def _check_generate(spec: "InterventionSpec", where: str) -> None:
    """Generate runs choose keys in the prompt (pipeline/control/generate.py)."""
    if spec.op == "patch":
        raise JobError(f"{where}': op \"patch\" is for forward runs (a pattern of another input has no place in a "
                       "growing generation); use scale, zero or bias with [generate]")
    keys = spec.keys or spec.except_keys
    name = "keys" if spec.keys is not None else "except_keys"
    if keys.column is not None or keys.group is not None:
        raise JobError(f"{where}.{name}': generate runs choose keys in the prompt by positions, spans, regex or "
                       f"segment ({', '.join(GENERATE_SEGMENTS)})")
    if keys.segment is not None and keys.segment not in GENERATE_SEGMENTS:
        raise JobError(f"{where}.{name}.segment' {keys.segment!r}: a generate run's segments are "
                       f"{', '.join(GENERATE_SEGMENTS)}")


def intervention_label(spec: "InterventionSpec", index: int) -> str:
    """The label of an intervention's rows: its own, or 'i<index>:<op>'."""
    return spec.label if spec.label is not None else f"i{index}:{spec.op}"


def _check_one(spec: "InterventionSpec", where: str, metadata: list[str], groups: list[str]) -> None:
    if spec.layer_heads is not None:
        pairs = spec.layer_heads
        if spec.layers != "all" or spec.heads != "all":
            raise JobError(f"{where}.layer_heads' replaces layers and heads; remove them")
        if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs) or len({tuple(p) for p in pairs}) != len(pairs):
            raise JobError(f"{where}.layer_heads' {pairs!r} must be a non-empty list of distinct [layer, head] pairs "
                           "of 0-based numbers")
    for name in ("layers", "heads"):
        value = getattr(spec, name)
        if value != "all" and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise JobError(f"{where}.{name}' {value!r} must be \"all\" or a non-empty list of distinct "
                           "0-based numbers")
    if spec.op == "patch":
        if spec.keys is not None or spec.except_keys is not None:
            raise JobError(f"{where}': op \"patch\" replaces whole patterns; remove keys/except_keys")
        if spec.patch_from is None:
            raise JobError(f"{where}': op \"patch\" needs patch_from, the metadata column holding each "
                           "document's paired text")
        if spec.patch_from not in metadata:
            raise JobError(f"{where}.patch_from' {spec.patch_from!r} is not in corpus.metadata_columns "
                           f"({', '.join(metadata) or 'none'}); add it there")
        return
    if spec.patch_from is not None:
        raise JobError(f"{where}.patch_from' applies to op \"patch\" only (this one is {spec.op!r})")
    if (spec.keys is None) == (spec.except_keys is None):
        raise JobError(f"{where}': op {spec.op!r} needs exactly one of keys (the keys acted on) or except_keys "
                       "(every key but these: PASTA's emphasis)")
    if spec.op == "bias" and spec.value is None:
        raise JobError(f"{where}.value' is missing: op \"bias\" adds this number to the chosen keys' scores")
    if spec.op != "bias" and spec.value is not None:
        raise JobError(f"{where}.value' applies to op \"bias\" only (this one is {spec.op!r})")
    name = "keys" if spec.keys is not None else "except_keys"
    _check_keys(spec.keys or spec.except_keys, f"{where}.{name}", metadata, groups)


def _check_keys(keys: "KeysSpec", where: str, metadata: list[str], groups: list[str]) -> None:
    given = [k for k in KEY_WAYS if getattr(keys, k) is not None]
    if len(given) != 1:
        raise JobError(f"{where}' must set exactly one of {', '.join(KEY_WAYS)} (got {', '.join(given) or 'none'})")
    if keys.positions is not None and (not keys.positions or min(keys.positions) < 0):
        raise JobError(f"{where}.positions' {keys.positions!r} must be a non-empty list of 0-based token positions")
    if keys.spans is not None:
        bad = [s for s in keys.spans if len(s) != 2 or s[0] < 0 or s[1] <= s[0]]
        if not keys.spans or bad:
            raise JobError(f"{where}.spans' {(bad or keys.spans)[0] if keys.spans else []!r} is not a character "
                           "span; give [start, end) pairs with 0 <= start < end")
    if keys.regex is not None:
        try:
            re.compile(keys.regex)
        except re.error as exc:
            raise JobError(f"{where}.regex' {keys.regex!r} is not a regular expression: {exc}") from None
        if re.compile(keys.regex).match(""):
            raise JobError(f"{where}.regex' {keys.regex!r} matches the empty string, which selects no key; "
                           "make it match at least one character")
    if keys.segment is not None and keys.segment not in SEGMENTS + GENERATE_SEGMENTS:
        raise JobError(f"{where}.segment' {keys.segment!r} must be one of {', '.join(SEGMENTS)} (generate runs: "
                       f"{', '.join(GENERATE_SEGMENTS)})")
    if keys.group is not None and keys.group not in groups:
        raise JobError(f"{where}.group' {keys.group!r} is not a [[groups]] name ({', '.join(groups) or 'none defined'})")
    if keys.column is not None and keys.column not in metadata:
        raise JobError(f"{where}.column' {keys.column!r} is not in corpus.metadata_columns "
                       f"({', '.join(metadata) or 'none'}); add it there")


def _check_effects(job: "JobSpec", source: str) -> None:
    targets = job.effects.targets
    if targets and len(targets) != 2:
        raise JobError(f"{source}: 'effects.targets' {targets!r} must name two tokens (logit of the first minus "
                       "the second)")
    if targets and not job.effects.logits:
        raise JobError(f"{source}: 'effects.targets' needs effects.logits = true (the language-model head)")


def check_against_model(job: "JobSpec", num_layers: int, num_heads: int, tokenizer) -> list[int]:
    """Layer and head numbers against the loaded model; returns the target token ids."""
    for i, spec in enumerate(job.interventions):
        pairs = spec.layer_heads or []
        for name, unit, limit, value in (
                ("layers", "layers", num_layers, spec.layers), ("heads", "heads", num_heads, spec.heads),
                ("layer_heads", "layers", num_layers, [p[0] for p in pairs] or "all"),
                ("layer_heads", "heads", num_heads, [p[1] for p in pairs] or "all")):
            if value != "all" and max(value) >= limit:
                raise JobError(f"interventions[{i}].{name}: {max(value)} is out of range; the model has {limit} "
                               f"{unit} (0..{limit - 1})")
    ids = []
    for token in job.effects.targets:
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise JobError(f"effects.targets: {token!r} is {len(pieces)} tokens for this tokenizer; name tokens "
                           "that are one token each (mind a leading space: ' he')")
        ids.append(pieces[0])
    return ids
