"""Autograd-aware collectives for context parallel: split/gather along a dim, all-to-all.

Gradient scaling. Under context parallel every rank holds a slice of the sequence, and the
parameter gradients of a rank only cover its slice. Megatron's DDP then *averages* them
over the data-parallel x context-parallel group, which would leave them `cp` times too
small. Two equivalent fixes exist: scale the loss by `cp` (Megatron's GPT does this), or
scale the gradient where the sequence is gathered back. `grad_scale` implements the second
(as MindSpeed-MM does): "up" multiplies the gradient by the group size in backward, "down"
divides by it, None leaves it exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

GRAD_SCALES = (None, "up", "down")


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _scale(x: torch.Tensor, group, grad_scale: Optional[str]) -> torch.Tensor:
    if grad_scale is None:
        return x
    if grad_scale == "up":
        return x * _size(group)
    if grad_scale == "down":
        return x / _size(group)
    raise ValueError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")


def split_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` (no communication)."""
    world = _size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(
            f"cannot split dimension {dim} of size {x.shape[dim]} evenly over {world} ranks"
        )
    return x.chunk(world, dim=dim)[_rank(group)].contiguous()


def gather_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    world = _size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class _SplitForwardGatherBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_scale):
        ctx.group, ctx.dim, ctx.grad_scale = group, dim, grad_scale
        return split_along_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = gather_along_dim(grad, ctx.group, ctx.dim)
        return _scale(grad, ctx.group, ctx.grad_scale), None, None, None


class _GatherForwardSplitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_scale):
        ctx.group, ctx.dim, ctx.grad_scale = group, dim, grad_scale
        return gather_along_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = split_along_dim(grad, ctx.group, ctx.dim)
        return _scale(grad, ctx.group, ctx.grad_scale), None, None, None


def split_forward_gather_backward(
    x: torch.Tensor, group, dim: int, grad_scale: Optional[str] = None
) -> torch.Tensor:
    """Keep this rank's chunk of a replicated tensor; backward gathers the gradient."""
    if _size(group) == 1:
        return x
    return _SplitForwardGatherBackward.apply(x, group, dim, grad_scale)


def gather_forward_split_backward(
    x: torch.Tensor, group, dim: int, grad_scale: Optional[str] = None
) -> torch.Tensor:
    """Concatenate every rank's chunk; backward keeps this rank's chunk of the gradient."""
    if _size(group) == 1:
        return x
    return _GatherForwardSplitBackward.apply(x, group, dim, grad_scale)


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = _size(group)
    scatter_dim %= x.dim()
    gather_dim %= x.dim()
    if x.shape[scatter_dim] % world != 0:
        raise ValueError(
            f"all-to-all cannot scatter dimension {scatter_dim} of size {x.shape[scatter_dim]} "
            f"over {world} ranks"
        )
    moved = x.movedim(scatter_dim, 0)
    send = moved.reshape(world, moved.shape[0] // world, *moved.shape[1:]).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] is rank i's chunk destined for this rank, still in the moved layout.
    chunks = [chunk.movedim(0, scatter_dim) for chunk in recv.unbind(0)]
    return torch.cat(chunks, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Scatter `scatter_dim` over the group and gather `gather_dim` from it (autograd-aware).

    With x of shape [b, s/P, n, d], scatter_dim=2 and gather_dim=1 give [b, s, n/P, d]: the
    Ulysses exchange from sequence-sharded to head-sharded.
    """
    if _size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)
