"""The ranks that work on the same videos (the TP x CP group): its size and the broadcast that makes their inputs
agree bit for bit. `group=None` means one rank working alone."""

from __future__ import annotations

from typing import Sequence

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
