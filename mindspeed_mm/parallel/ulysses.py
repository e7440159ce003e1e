"""Ulysses context parallel attention: trade sequence shards for head shards around the core.

Each context-parallel rank holds q, k, v for its slice of the sequence and all of its
(tensor-parallel) heads: [b, s/P, n, d]. One all-to-all gives every rank the whole sequence
for n/P heads, attention runs unchanged, and the inverse all-to-all restores the sequence
shard. Attention is exact: no approximation and no change to the softmax.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .comm import all_to_all, gather_along_dim

# attention_fn(q, k, v, key_mask) with q/k/v [b, s, n, d] and key_mask [b, s_k] bool
# (True = attend) or None; returns [b, s, n, d].
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class UlyssesAttention(nn.Module):
    """Wraps a core attention function with the Ulysses all-to-all over `group`.

    Inputs are in "bsnd" layout with the sequence sharded over the group, contiguous chunks
    in rank order. `key_mask`, if given, is this rank's slice [b, s/P] of a key-padding mask
    (True = attend); it is gathered to the full key length.
    """

    def __init__(self, attention_fn: AttentionFn, group=None, seq_dim: int = 1, head_dim: int = 2):
        super().__init__()
        self.attention_fn = attention_fn
        self.group = group
        self.seq_dim = seq_dim
        self.head_dim = head_dim

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        group = self.group
        world = 1 if group is None else dist.get_world_size(group)
        if world == 1:
            return self.attention_fn(q, k, v, key_mask)
        heads = q.shape[self.head_dim]
        if heads % world != 0:
            raise ValueError(
                f"Ulysses context parallel needs the attention heads on this rank ({heads}) to be "
                f"divisible by --context-parallel-size {world}"
            )
        q, k, v = (all_to_all(t, group, self.head_dim, self.seq_dim) for t in (q, k, v))
        if key_mask is not None:
            key_mask = gather_along_dim(key_mask, group, dim=1)
        out = self.attention_fn(q, k, v, key_mask)
        return all_to_all(out, group, self.seq_dim, self.head_dim)
