"""The recipe registry: name -> function, output table, parameters and version.

A recipe's version is bumped whenever its output changes for the same input; it is stored in
the Parquet metadata and the manifest so old and new data are never mixed up silently.
"""

from __future__ import annotations

import ast
import importlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RecipeError

# The registry itself needs no torch: checking a job file (names, parameters) stays fast. The
# recipe functions and the tensor types are imported on first use.
_LAZY = {"HEAD_MEAN": ".attention", "BatchMasks": ".attention", "LayerAttention": ".attention"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # Every recipe can run on words (LayerAttention.words in attention.py). Only "word" is written into the
    # recipe's parameters (validate_recipe drops the default), so token-level recipe ids, labels
    # and job fingerprints stay what they were before the parameter existed.
    level: Literal["token", "word"] = Field(
        default="token", description="token: rows index tokens; word: attention pooled onto words "
        "(to a word: sum over its pieces; from a word: mean over its pieces), rows index words")


class NoParams(_Params):
    pass


class TopkParams(_Params):
    k: int = Field(default=8, ge=1, description="keys kept per query")
    per_head: bool = Field(default=True, description="per head, or on the mean over heads")


class ThresholdParams(_Params):
    t: float = Field(default=0.1, ge=0.0, le=1.0, description="keep weights strictly above t")
    per_head: bool = Field(default=True, description="per head, or on the mean over heads")


class ToppParams(_Params):
    p: float = Field(default=0.9, gt=0.0, le=1.0, description="attention mass to cover")
    per_head: bool = Field(default=True, description="per head, or on the mean over heads")


class GroupsParams(_Params):
    per_head: bool = Field(default=True, description="per head, or on the mean over heads")


class RolloutParams(_Params):
    k: int = Field(default=8, ge=1, description="keys of the rolled-out map kept per query")


class DenseParams(_Params):
    max_tokens: int = Field(default=64, ge=1, description="only windows up to this many tokens")
    per_head: bool = Field(default=True, description="every head, or only the head mean")


class ScalarParams(_Params):
    """The scalar F a gradient recipe explains, one value per window (pipeline/control/scalars.py
    defines each). Recipes with the same scalar share one backward pass."""

    level: Literal["token"] = Field(default="token", description="gradient recipes run on tokens only")
    scalar: Literal["auto", "pooled_norm", "logprob", "token", "class"] = Field(
        default="auto", description="F: pooled_norm (norm of the mean of the last hidden states over real "
        "tokens), logprob (decoders: log-probability of the window's own next tokens), token (decoders: "
        "log-probability of `token` after the window), class (logit of `label`); auto: logprob for "
        "decoders, pooled_norm otherwise")
    position: Literal["sum", "last"] = Field(
        default="sum", description="logprob: summed over every real next token, or of the last token only")
    token: int | str | None = Field(default=None, description="scalar = token: a token id, or a string "
                                    "the tokenizer makes one token")
    label: int | str | None = Field(default=None, description="scalar = class: the class index, or its "
                                    "name in the model's id2label")

    @model_validator(mode="after")
    def _scalar_inputs(self):
        if (self.scalar == "token") != (self.token is not None):
            raise ValueError("token is given exactly when scalar = 'token' (a token id or a one-token string)")
        if (self.scalar == "class") != (self.label is not None):
            raise ValueError("label is given exactly when scalar = 'class' (a class index or id2label name)")
        return self


class SaliencyParams(ScalarParams):
    k: int = Field(default=8, ge=1, description="keys kept per query, by |attribution|")


class IntegratedParams(SaliencyParams):
    steps: int = Field(default=20, ge=1, le=1000, description="Riemann steps of the integral over alpha")
    rule: Literal["right", "midpoint"] = Field(
        default="right", description="alpha at step j of m: j/m (Hao et al.), or (j - 1/2)/m (error O(1/m^2))")


class SaliencyHeadsParams(ScalarParams):
    pass


class IntegratedHeadsParams(ScalarParams):
    steps: int = Field(default=20, ge=1, le=1000, description="Riemann steps of the integral over alpha")
    rule: Literal["right", "midpoint"] = Field(
        default="right", description="alpha at step j of m: j/m (Hao et al.), or (j - 1/2)/m (error O(1/m^2))")


class GradRolloutParams(ScalarParams):
    k: int = Field(default=8, ge=1, description="keys of the rolled-out map kept per query")


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str  # "module:function", the module relative to this package; imported on first use
    table: str
    params: type[_Params]
    version: int
    stateful: bool = False  # rollout carries its product from one layer to the next
    gradients: bool = False  # needs dF/dA: reduce hands the batch to pipeline/control/gradients.py
    # How a long window's queries are taken a block at a time (reduce.query_blocks): "rows" (one
    # row set per query), "sum" (the blocks' columns add up), None (needs the whole (T, T) map).
    blocks: str | None = None

    @cached_property
    def fn(self) -> Callable:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module, __name__), function)

    @property
    def doc(self) -> str:
        """The function's docstring, read from its source without importing it (the recipe
        modules import torch, which `attnpipe recipes` and job checks do not need)."""
        module, _, function = self.target.partition(":")
        source = Path(__file__).with_name(module.lstrip(".") + ".py").read_text(encoding="utf-8")
        node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function)
        return (ast.get_docstring(node) or "").strip()


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    # v2: its token count is window_tokens (was n_tokens).
    Recipe("head_stats", ".head_stats:head_stats", "head_stats", NoParams, 2, blocks="sum"),
    Recipe("topk", ".masks:topk", "edges", TopkParams, 1, blocks="rows"),
    Recipe("threshold", ".masks:threshold", "edges", ThresholdParams, 1, blocks="rows"),
    Recipe("topp", ".masks:topp", "edges", ToppParams, 1, blocks="rows"),
    Recipe("rollout", ".rollout:rollout", "rollout", RolloutParams, 1, stateful=True),
    Recipe("dense", ".dense:dense", "maps", DenseParams, 1, blocks="rows"),
    Recipe("groups", ".groups:groups", "group_mass", GroupsParams, 1),
    # Saliency (pipeline/recipes/saliency.py): attention times a gradient of a chosen scalar.
    Recipe("attn_grad", ".saliency:attn_grad", "saliency", SaliencyParams, 1, gradients=True),
    Recipe("attn_grad_heads", ".saliency:attn_grad_heads", "saliency_heads", SaliencyHeadsParams, 1,
           gradients=True),
    Recipe("attn_ig", ".saliency:attn_ig", "saliency", IntegratedParams, 1, gradients=True),
    Recipe("attn_ig_heads", ".saliency:attn_ig_heads", "saliency_heads", IntegratedHeadsParams, 1,
           gradients=True),
    Recipe("grad_rollout", ".saliency:grad_rollout", "saliency", GradRolloutParams, 1, stateful=True,
           gradients=True),
]}


def needs_whole_map(spec: dict[str, Any]) -> bool:
    """Whether a recipe needs each layer's whole (head, T, T) map of a window: rollout, groups,
    gradient and word-level recipes; the others take a window's queries a block at a time."""
    return RECIPES[spec["name"]].blocks is None or spec.get("level") == "word"


def validate_recipe(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a recipe entry {name, **params}; return it with every default filled in."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise RecipeError(f"{where}: each recipe needs a 'name'; valid names: {', '.join(RECIPES)}")
    name = spec["name"]
    if name not in RECIPES:
        raise RecipeError(f"{where}: unknown recipe {name!r}; valid names: {', '.join(RECIPES)}")
    params = {k: v for k, v in spec.items() if k != "name"}
    model = RECIPES[name].params
    try:
        checked = model.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if not key:  # a check across parameters (ScalarParams)
            raise RecipeError(f"{where} ({name}): {err['msg'].removeprefix('Value error, ')}") from None
        if err["type"] == "extra_forbidden":
            valid = ", ".join(model.model_fields) or "(none)"
            raise RecipeError(f"{where} ({name}): unknown parameter {key!r}; valid: {valid}") from None
        raise RecipeError(f"{where} ({name}): {key!r}: {err['msg']} (got {err.get('input')!r})") from None
    # Unset optional parameters (a gradient recipe's token or label) are left out, like level = token.
    params = {k: v for k, v in checked.model_dump().items() if v is not None}
    if params["level"] == "token":
        del params["level"]
    return {"name": name, **params}


def recipe_params(spec: dict[str, Any]) -> str:
    """Canonical JSON of a recipe's parameters: the `recipe_params` column and part of its id."""
    return json.dumps({k: v for k, v in spec.items() if k != "name"}, sort_keys=True,
                      separators=(",", ":"))


def recipe_id(spec: dict[str, Any]) -> str:
    return f"{spec['name']}{recipe_params(spec)}"


__all__ = ["RECIPES", "Recipe", "BatchMasks", "LayerAttention", "HEAD_MEAN", "needs_whole_map", "validate_recipe",
           "recipe_params", "recipe_id"]
