"""The scalar F a gradient recipe explains: one value per window, from one forward pass.

- pooled_norm: ||mean over the window's real tokens of the last hidden state||_2 (the mean
  pooling sentence-transformers applies for all-MiniLM-L6-v2; the norm is taken before its
  final normalisation, which would make it 1).
- logprob (decoders): position = "sum": sum over t = 0..n-2 of log p(x_{t+1} | x_{<=t}), the
  log-likelihood of the window's own real tokens after its first; "last": log p(x_{n-1} | x_{<n-1})
  only (n = the window's real tokens; 0 for a one-token window).
- token (decoders): log p(token | the whole window), the next token after the last real one.
- class: the logit of `label` from the model's sequence-classification head.

Logits are h W^T with W the language-model head: the model's own when it has one, else the
input embeddings when the config ties them (GPT-2, SmolLM2), else `lm_head.weight` read from the
model folder's safetensors. A classifier head is loaded from the folder with
AutoModelForSequenceClassification and run on the loaded model's own layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import RecipeError
from ..model import LoadedModel

SCALAR_KEYS = ("scalar", "position", "token", "label")

# (input_ids, attention_mask) -> F, (batch,); runs the model once
ScalarFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Scalar:
    """What F is, from a recipe's parameters (pipeline/recipes ScalarParams)."""

    scalar: str = "auto"
    position: str = "sum"
    token: int | str | None = None
    label: int | str | None = None

    @classmethod
    def of(cls, spec: dict) -> "Scalar":
        return cls(**{k: spec[k] for k in SCALAR_KEYS if k in spec})

    def kind(self, lm: LoadedModel) -> str:
        if self.scalar != "auto":
            return self.scalar
        return "logprob" if lm.causal else "pooled_norm"


def scalar_fn(lm: LoadedModel, scalar: Scalar) -> tuple[ScalarFn, torch.nn.Module]:
    """F as a function of the batch, and the module it runs (whose attention implementation the
    gradient driver switches). Raises RecipeError when the model cannot give this F."""
    kind = scalar.kind(lm)
    if kind == "class":
        return _class_fn(lm, scalar.label)
    runner = lm.encoder if lm.model.config.is_encoder_decoder else lm.model.base_model
    if kind == "pooled_norm":
        return (lambda ids, mask: pooled_norm(_hidden(runner, ids, mask), mask)), runner
    if not lm.causal:
        raise RecipeError(f"recipe scalar {kind!r} needs a decoder language model; {lm.name} is not causal "
                          "(use scalar = 'pooled_norm', or 'class' with a classifier)")
    head = lm_head(lm)
    if kind == "logprob":
        return (lambda ids, mask: next_logprob(head, _hidden(runner, ids, mask), ids, mask, scalar.position)), runner
    token = token_id(lm, scalar.token)
    return (lambda ids, mask: target_logprob(head, _hidden(runner, ids, mask), mask, token)), runner


def _hidden(runner: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return runner(input_ids=ids, attention_mask=mask).last_hidden_state  # (batch, pos, hidden)


def pooled_norm(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch,) the norm of the mean of `hidden` over real tokens."""
    m = mask[..., None].to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return pooled.float().norm(dim=-1)


def next_logprob(head: Callable, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 position: str) -> torch.Tensor:
    """(batch,) log p of the window's own next tokens: summed, or of the last one."""
    if position == "last":
        lengths = mask.sum(1)
        at = (lengths - 2).clamp_min(0)  # the position that predicts the last real token
        rows = torch.arange(len(ids), device=ids.device)
        logp = torch.log_softmax(head(hidden[rows, at]).float(), -1)  # (batch, vocab)
        return torch.where(lengths >= 2, logp[rows, ids[rows, at + 1]], torch.zeros_like(logp[:, 0]))
    logp = torch.log_softmax(head(hidden[:, :-1]).float(), -1)  # (batch, pos - 1, vocab)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (picked * mask[:, 1:]).sum(1)  # right padding: a real next token has a real predecessor


def target_logprob(head: Callable, hidden: torch.Tensor, mask: torch.Tensor, token: int) -> torch.Tensor:
    """(batch,) log p(token) after each window's last real token."""
    rows = torch.arange(len(hidden), device=hidden.device)
    last = hidden[rows, mask.sum(1) - 1]  # (batch, hidden)
    return torch.log_softmax(head(last).float(), -1)[:, token]


def lm_head(lm: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits of the model's language-model head (see the module docstring)."""
    config = lm.model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise RecipeError(f"{lm.name}: logit soft-capping or scaling is not supported by the logprob and token "
                          "scalars; use scalar = 'pooled_norm'")
    own = lm.model.get_output_embeddings()
    if own is not None:
        return own
    if getattr(config, "tie_word_embeddings", False):
        weight = lm.model.get_input_embeddings().weight
        return lambda h: h @ weight.T
    weight = _stored_head(lm)
    return lambda h: h @ weight.T


def _stored_head(lm: LoadedModel) -> torch.Tensor:
    """lm_head.weight from the model folder's safetensors (AutoModel leaves it out)."""
    from safetensors import safe_open

    source = lm.provenance.get("source")
    for path in sorted(Path(source).glob("*.safetensors")) if source else []:
        with safe_open(str(path), framework="pt") as f:
            if "lm_head.weight" in f.keys():
                return f.get_tensor("lm_head.weight").to(lm.device, lm.model.dtype)
    raise RecipeError(f"{lm.name}: no language-model head (lm_head.weight) in the model folder and the "
                      "embeddings are not tied; the logprob and token scalars need it (use 'pooled_norm')")


def token_id(lm: LoadedModel, token: int | str) -> int:
    """A token id, given as an id or as a string the tokenizer makes exactly one token."""
    vocab = len(lm.tokenizer)
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise RecipeError(f"recipe token = {token}: not a token id of {lm.name} (0 to {vocab - 1})")
        return token
    ids = lm.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise RecipeError(f"recipe token = {token!r} is {len(ids)} tokens for {lm.name}'s tokenizer "
                          f"({lm.tokenizer.convert_ids_to_tokens(ids)}); give one token or its id")
    return ids[0]


def _class_fn(lm: LoadedModel, label: int | str) -> tuple[ScalarFn, torch.nn.Module]:
    classifier = _classifier(lm)
    index = class_index(classifier.config, label)
    return (lambda ids, mask: classifier(input_ids=ids, attention_mask=mask).logits[:, index].float()), classifier


def class_index(config, label: int | str) -> int:
    names = {str(v): int(k) for k, v in (config.id2label or {}).items()}
    index = names.get(label) if isinstance(label, str) else label
    if index is None or not 0 <= index < config.num_labels:
        raise RecipeError(f"recipe label = {label!r}: not a class of this classifier; valid: "
                          f"0 to {config.num_labels - 1} or {sorted(names)}")
    return index


def _classifier(lm: LoadedModel) -> torch.nn.Module:
    """The model folder's sequence classifier, its body replaced by the loaded model (loaded once)."""
    cached = lm.__dict__.get("_attnpipe_classifier")
    if cached is not None:
        return cached
    from transformers import AutoModelForSequenceClassification

    source = lm.provenance.get("source")
    kinds = getattr(lm.model.config, "architectures", None) or []
    if not source or not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise RecipeError(f"recipe scalar 'class' needs a sequence-classification model; {lm.name} is "
                          f"{', '.join(kinds) or 'a bare model'} (use 'pooled_norm' or 'logprob')")
    from ..model import LOADING

    with LOADING:  # one load at a time in a process (model.LOADING)
        classifier = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=lm.model.dtype, use_safetensors=True)
    setattr(classifier, classifier.base_model_prefix, lm.model.base_model)
    classifier.eval().to(lm.device)
    lm.__dict__["_attnpipe_classifier"] = classifier
    return classifier
