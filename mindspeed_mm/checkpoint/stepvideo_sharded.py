"""The DiT's sharded state dict for Megatron-core distributed checkpoints (`--ckpt-format torch_dist`).

Every parameter is described by its global shape and this rank's place in it, from `parallelize.TP_PLAN`, so a
checkpoint saved at one TP (or DP) size loads at another:

- replicated parameters: the whole tensor, written once (by TP rank 0 of data-parallel rank 0);
- column-parallel weights and biases: split on dim 0, row-parallel weights on dim 1;
- fused column weights ([Q; K; V] of self-attention, [K; V] of cross-attention): each TP rank holds its heads of
  every part, [Q_r; K_r; V_r], which is not a slice of the full [Q; K; V]. They are stored as (parts, rows, ...)
  with the rows split, through a `ShardedTensorFactory` whose data is the parameter itself, so that the
  distributed optimizer finds its states by parameter and stores them the same way.

Keys are the parameters' state-dict names (MindSpeed-MM's), after `prefix`.
"""

from __future__ import annotations

from typing import Dict

import torch

from .stepvideo_layout import plan_for_parameter, split_dim


def _groups():
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    return (tp, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))


def _fused_factory(key: str, param: torch.Tensor, parts: int, tp: int, tp_rank: int, dp_rank: int):
    """[P0_r; P1_r; ...] on TP rank r, stored as the global (parts, rows, ...) with the rows split over TP."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def build(key, tensor, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(f"{key}: flattened optimizer states are not supported for fused weights")
        stacked = tensor.view(parts, tensor.shape[0] // parts, *tensor.shape[1:])
        return ShardedTensor.from_rank_offsets(key, stacked, (1, tp_rank, tp), replica_id=replica_id)

    def merge(loaded):
        return loaded.reshape(-1, *loaded.shape[2:])

    return ShardedTensorFactory(key, param, build, merge, replica_id=(0, 0, dp_rank))


def dit_sharded_state_dict(model: torch.nn.Module, prefix: str = "") -> Dict[str, object]:
    """{prefix + name: ShardedTensor or ShardedTensorFactory} for every tensor of `model.state_dict()`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp, tp_rank, dp_rank = _groups()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = prefix + name
        plan, leaf = plan_for_parameter(name)
        dim = None if plan is None else split_dim(plan, leaf)
        if dim is None:  # replicated over TP: TP rank 0 of DP rank 0 writes it
            out[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=(0, tp_rank, dp_rank))
        elif dim == 0 and plan.fused > 1:
            out[key] = _fused_factory(key, tensor, plan.fused, tp, tp_rank, dp_rank)
        else:
            out[key] = ShardedTensor.from_rank_offsets(key, tensor, (dim, tp_rank, tp), replica_id=(0, 0, dp_rank))
    return out
