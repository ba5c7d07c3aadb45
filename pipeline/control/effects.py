"""How far an intervention moved the model's output, per window (the `effects` table).

Definitions (P: the unedited pass, Q: the intervened one; real tokens: a window's non-padding
positions; the last real token is where a decoder predicts what follows the window):

- cosine: cos(mean_P, mean_Q) of the pooled embeddings, the mean of the final hidden states over
  the real tokens (sentence-transformers' mean pooling; for all-MiniLM-L6-v2 the embedding
  before its normalisation, which a cosine ignores).
- kl_mean / kl_last: KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) of the next-token
  distributions, in nats, averaged over the real tokens / at the last real token.
- logit_diff: logit(t0) - logit(t1) at the last real token for the two effects.targets.
- kl_class: KL(P || Q) of a sequence-classification model's class distributions (softmax of its
  logits), in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Outputs:
    """What the effects need of one pass over a batch, reduced as soon as the pass ends."""

    pooled: torch.Tensor  # (batch, hidden) float32
    logprobs: torch.Tensor | None = None  # (batch, pos, vocab) float32 log-softmax; None without logits
    last_logits: torch.Tensor | None = None  # (batch, vocab) float32 at the last real token
    class_logprobs: torch.Tensor | None = None  # (batch, class) float32 log-softmax of a classifier

    def rows(self, lo: int, hi: int, width: int) -> "Outputs":
        """Windows lo..hi, positions cut to `width` (their own padded length)."""
        cut = lambda t: None if t is None else t[lo:hi]  # noqa: E731
        return Outputs(self.pooled[lo:hi], None if self.logprobs is None else self.logprobs[lo:hi, :width],
                       cut(self.last_logits), cut(self.class_logprobs))

    @classmethod
    def of(cls, output, attention_mask: torch.Tensor) -> "Outputs":
        """From a transformers output: last_hidden_state (or hidden_states[-1] and logits of a
        language model, run with output_hidden_states)."""
        logits = getattr(output, "logits", None)
        hidden = output.last_hidden_state if logits is None else output.hidden_states[-1]
        pooled = mean_pool(hidden, attention_mask)
        if logits is None:
            return cls(pooled)
        if logits.dim() == 2:  # a sequence classifier: one distribution over its classes per window
            return cls(pooled, class_logprobs=torch.log_softmax(logits.float(), dim=-1))
        last = attention_mask.sum(1) - 1  # (batch,)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return cls(pooled, torch.log_softmax(logits.float(), dim=-1), logits[rows, last].float())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, pos, hidden) -> (batch, hidden): the mean over real tokens."""
    weights = attention_mask.to(torch.float32)[:, :, None]  # (batch, pos, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def cosine(p: Outputs, q: Outputs) -> torch.Tensor:
    """(batch,): cosine of the pooled embeddings."""
    return torch.nn.functional.cosine_similarity(p.pooled, q.pooled, dim=-1)


def kl(p: Outputs, q: Outputs, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch,) KL(P || Q) of the next-token distributions: mean over real tokens, and at the last."""
    per_pos = (p.logprobs.exp() * (p.logprobs - q.logprobs)).sum(-1)  # (batch, pos)
    real = attention_mask.to(torch.float32)
    mean = (per_pos * real).sum(1) / real.sum(1).clamp(min=1.0)
    last = per_pos[torch.arange(per_pos.shape[0], device=per_pos.device), attention_mask.sum(1) - 1]
    return mean, last


def logit_diff(out: Outputs, targets: list[int]) -> torch.Tensor:
    """(batch,): logit(targets[0]) - logit(targets[1]) at the last real token."""
    return out.last_logits[:, targets[0]] - out.last_logits[:, targets[1]]


def measure(p: Outputs, q: Outputs, attention_mask: torch.Tensor, targets: list[int]) -> dict[str, torch.Tensor]:
    """Every measure the two passes allow: cosine always; KL and logit differences with logits."""
    out = {"cosine": cosine(p, q)}
    if p.logprobs is not None:
        out["kl_mean"], out["kl_last"] = kl(p, q, attention_mask)
    if p.class_logprobs is not None:
        out["kl_class"] = (p.class_logprobs.exp() * (p.class_logprobs - q.class_logprobs)).sum(-1)
    if targets and p.last_logits is not None:
        out["logit_diff"], out["logit_diff_clean"] = logit_diff(q, targets), logit_diff(p, targets)
    return out
