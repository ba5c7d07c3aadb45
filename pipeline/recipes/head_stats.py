"""Per-head statistics of Clark et al. 2019, "What Does BERT Look At?"."""

from __future__ import annotations

import math

import torch

from .attention import LayerAttention

_SLICE_BYTES = 1 << 20  # of P per slice on the CPU: about half a core's L2 cache
_TINY = torch.finfo(torch.float32).tiny


def _per_query_weights(m, dtype) -> torch.Tensor:
    """(query_pos, key_pos, 4): |query_pos - key_pos|, and indicators of the key being the
    query itself, the token before, the token after. One product with P gives all four."""
    q, k = m.positions[:, None], m.positions[None, :]
    return torch.stack([(q - k).abs(), q == k, k == q - 1, k == q + 1], dim=-1).to(dtype)


def _keys_seen(m) -> torch.Tensor:
    """(batch, query_pos) how many keys each query sees: the window's length, or up to itself."""
    n = m.lengths[:, None].expand(-1, m.size)
    return torch.minimum(n, m.positions[None, :] + 1) if m.causal else n


def head_stats(att: LayerAttention) -> dict[str, torch.Tensor]:
    """One row per window x layer x head, each a mean over the window's real query tokens:

    entropy (nats) and entropy_norm (divided by ln of the number of keys the query sees; 0 when it
    sees one key); first_mass (on position 0, [CLS] or the first token); sep_mass (on separator /
    end tokens); special_mass (on any special token); self_mass, prev_mass, next_mass (on the
    query itself, the token before, the token after); punct_mass (on punctuation tokens);
    mean_distance (expected |query_pos - key_pos| in tokens).
    """
    m = att.masks
    p = att.clean  # (batch, head, query_pos, key_pos), zero on padded and future keys
    batch, heads, size, _ = p.shape
    first = torch.zeros_like(m.sep)
    first[:, 0] = True
    key_sets = torch.stack([first, m.sep, m.special, m.punct], dim=-1).to(p.dtype)  # (batch, key_pos, 4)
    query_weights = _per_query_weights(m, p.dtype)  # (query_pos, key_pos, 4)
    # Three products with P per window: sum P log P, the masses on fixed key sets, and the
    # query-relative ones. On the CPU they run a few windows at a time, so that each slice of P
    # stays in cache across the three; that, and a vectorised log in place of xlogy, is 3x.
    step = max(1, _SLICE_BYTES // (p[0].numel() * p.element_size())) if p.device.type == "cpu" else batch
    scratch = torch.empty((min(step, batch), heads, size, size), dtype=p.dtype, device=p.device)
    p_log_p = torch.empty(batch, heads, size, dtype=p.dtype, device=p.device)
    fixed = torch.empty(batch, heads, size, 4, dtype=p.dtype, device=p.device)
    relative = torch.empty(batch, heads, size, 4, dtype=p.dtype, device=p.device)
    for lo in range(0, batch, step):
        part, rows = p[lo:lo + step], slice(lo, lo + step)
        # P log P with log clamped at the smallest normal float: exact zeros (padding, the
        # future) give 0 * -87.3, and weights below 1e-38 add under 1e-36 to the sum.
        logs = torch.clamp_min(part, _TINY, out=scratch[:len(part)]).log_()
        torch.sum(logs.mul_(part), dim=-1, out=p_log_p[rows])
        torch.matmul(part, key_sets[rows, None], out=fixed[rows])
        relative[rows] = torch.einsum("bhqk,qkc->bhqc", part, query_weights)
    entropy = -p_log_p  # (batch, head, query_pos)
    n_keys = _keys_seen(m).to(p.dtype)[:, None, :]  # (batch, 1, query_pos)
    log_n = torch.where(n_keys > 1, n_keys.clamp_min(2).log(), torch.full_like(n_keys, math.inf))
    # Means over the real queries as products with their weights (batch, query_pos): no pass over
    # padded rows, whose values (finite, from the softmax) are multiplied by exact zeros.
    weights = m.token_valid.to(p.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
    entropies = torch.stack([entropy, entropy / log_n.expand_as(entropy)], dim=-1)  # (batch, head, query_pos, 2)
    mean_of = lambda x: torch.einsum("bhqc,bq->bhc", x, weights)  # noqa: E731
    e, f, r = mean_of(entropies), mean_of(fixed), mean_of(relative)
    means = torch.cat([e, f[..., :3], r[..., 1:], f[..., 3:], r[..., :1]], dim=-1)  # (batch, head, 10), STATS order
    cols = {"batch_index": torch.arange(batch, device=p.device).repeat_interleave(heads),
            "head": torch.arange(heads, device=p.device).repeat(batch),
            "window_tokens": m.lengths.repeat_interleave(heads)}
    cols.update({name: means[..., i].reshape(-1) for i, name in enumerate(STATS)})
    return cols


STATS = ("entropy", "entropy_norm", "first_mass", "sep_mass", "special_mass", "self_mass", "prev_mass",
         "next_mass", "punct_mass", "mean_distance")
