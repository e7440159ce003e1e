"""The ranks that work on the same videos (the TP x CP group): its size and the broadcast that makes their inputs
agree bit for bit. `group=None` means one rank working alone."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def broadcast_from_first(tensors: Sequence[torch.Tensor], group) -> None:
    """In place: every rank of `group` gets the group's first rank's values (no-op without a group)."""
    if group is None or group_size(group) < 2:
        return
    src = dist.get_global_rank(group, 0)
    for tensor in tensors:
        dist.broadcast(tensor, src=src, group=group)


def share_from_first(tensors: Optional[Sequence[torch.Tensor]], group, device) -> List[torch.Tensor]:
    """The group's first rank's `tensors` on every rank of `group` (the others pass None and learn the shapes and
    dtypes from it first); without a group, `tensors` as they are."""
    if group is None or group_size(group) < 2:
        return list(tensors)
    src = dist.get_global_rank(group, 0)
    meta = [[(tuple(t.shape), t.dtype) for t in tensors] if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(meta, src=src, group=group, device=device)
    if dist.get_rank(group) == 0:
        out = [t.to(device).contiguous() for t in tensors]
    else:
        out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in meta[0]]
    for tensor in out:
        dist.broadcast(tensor, src=src, group=group)
    return out
