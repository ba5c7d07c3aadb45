"""Attention mass between groups of tokens (the job's [[groups]], pipeline/groups.py): the data of
bias studies (AttenD, Gaci et al. 2022: attention to each social group's words; Vig et al. 2020:
pronoun to occupation)."""

from __future__ import annotations

import torch

from .attention import HEAD_MEAN, LayerAttention


def groups(att: LayerAttention, *, per_head: bool) -> dict[str, torch.Tensor]:
    """One row per window x layer x head x (from group, to group) where both groups have tokens in
    the window: mass = the mean over the from-group's tokens (as queries) of the attention they put
    on the to-group's tokens (as keys), summed over those keys. from_tokens and to_tokens count
    them. A causal model's queries see no later keys, so a group that only follows the from-group
    gets mass 0. per_head=false: on the mean over heads (head = -1).
    """
    m = att.masks
    if m.groups is None:
        raise ValueError("the groups recipe needs the batch's token groups (batch_masks(..., groups=True))")
    p = att.select(per_head)  # (batch, head, query_pos, key_pos), zero on padding and the future
    query_in = m.groups.float()  # (batch, group, query_pos)
    key_in = m.key_side.groups.float()  # (batch, group, key_pos)
    to = p @ key_in.transpose(1, 2)[:, None]  # (batch, head, query_pos, to group)
    n_from, n_to = query_in.sum(-1), key_in.sum(-1)  # (batch, group)
    mean_from = query_in / n_from.clamp_min(1.0)[..., None]
    mass = torch.einsum("bfq,bhqt->bhft", mean_from, to)  # (batch, head, from group, to group)
    present = (n_from[:, :, None] > 0) & (n_to[:, None, :] > 0)  # (batch, from, to)
    keep = present[:, None].expand_as(mass)
    b, h, f, t = keep.nonzero(as_tuple=True)
    return {"batch_index": b, "head": h if per_head else torch.full_like(h, HEAD_MEAN),
            "from_group": f.to(torch.int16), "to_group": t.to(torch.int16),
            "from_tokens": n_from[b, f].to(torch.int32), "to_tokens": n_to[b, t].to(torch.int32),
            "mass": mass[b, h, f, t].float()}
