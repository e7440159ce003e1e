"""Parallel primitives: split/gather along a dim and Ulysses all-to-all (autograd-aware)."""

from .comm import (
    all_to_all,
    gather_along_dim,
    gather_forward_split_backward,
    split_along_dim,
    split_forward_gather_backward,
)
from .ring import RingAttention, ring_attention
from .ulysses import UlyssesAttention

__all__ = [
    "RingAttention",
    "UlyssesAttention",
    "all_to_all",
    "gather_along_dim",
    "gather_forward_split_backward",
    "ring_attention",
    "split_along_dim",
    "split_forward_gather_backward",
]
