"""Training state in Megatron-core distributed checkpoints (`--ckpt-format torch_dist`), resharded on load.

What an iteration folder holds, each tensor under its global shape so that any TP x DP (x CP) layout reads it:

- `model.<name>`: the DiT (`models/predictor/stepvideo/sharded_state_dict.py`);
- the optimizer:
  - distributed optimizer: for every parameter, its fp32 main copy and Adam moments under
    `optimizer.state.{param,exp_avg,exp_avg_sq}.model.<name>`, in the parameter's global shape. Each data-parallel
    rank owns a flat range of each parameter's TP-local tensor; that range is written as the few rectangular blocks
    it covers (at most two per dimension), so every rank writes only what it holds: no gather onto data-parallel
    rank 0 (Megatron-core's reshardable format gathers each TP rank's whole state there, about 45 GB per TP rank for
    the released model at TP=8). On load every rank reads its new ranges from whichever blocks hold them. The
    rank-independent part (param groups, step, loss scaler) is in the common state;
  - otherwise: Megatron-core's own sharded optimizer state (`optimizer.sharded_state_dict`);
- the LR scheduler, iteration, consumed samples and the parallel layout (common state, written by rank 0);
- every rank's RNG states (restored only when the layout is the same).

Writes are spread over ranks by Megatron-core's fully parallel strategy (each replicated tensor is written by one rank
of the data-parallel group).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist

from ..checkpoint.dist_format import MODEL_PREFIX
from ..checkpoint.megatron_layout import CheckpointError
from ..checkpoint.stepvideo_layout import plan_for_parameter, split_dim

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def _inner_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


def uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _inner_optimizers(optimizer))


def layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


# --- where a TP-local tensor sits in the global one --------------------------------------------------------------


def placement(name: str, local_shape: Tuple[int, ...], tp: int, tp_rank: int):
    """(view shape of the local tensor, global shape, offset of the view in the global tensor)."""
    plan, leaf = plan_for_parameter(name)
    dim = None if plan is None else split_dim(plan, leaf)
    shape = tuple(local_shape)
    if dim is None:
        return shape, shape, (0,) * len(shape)
    if dim == 0 and plan.fused > 1:  # [P0_r; P1_r; ...]: (parts, rows, ...) with the rows split
        view = (plan.fused, shape[0] // plan.fused, *shape[1:])
        glob = (view[0], view[1] * tp, *view[2:])
        return view, glob, (0, view[1] * tp_rank) + (0,) * (len(view) - 2)
    glob = tuple(s * tp if d == dim else s for d, s in enumerate(shape))
    return shape, glob, tuple(s * tp_rank if d == dim else 0 for d, s in enumerate(shape))


def flat_range_blocks(shape: Tuple[int, ...], start: int, stop: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """The hyper-rectangles (index of the first element, block shape) that make up the row-major flat range
    [start, stop) of an array of `shape`, in order."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    sub = shape[1:]
    if first == last:
        return [((first, *idx), (1, *blk)) for idx, blk in flat_range_blocks(sub, start - first * inner,
                                                                              stop - first * inner)]
    blocks = []
    head_end = first * inner + inner
    if start % inner:
        blocks += [((first, *idx), (1, *blk)) for idx, blk in flat_range_blocks(sub, start % inner, inner)]
        first += 1
    full_end = stop // inner
    if full_end > first:
        blocks.append(((first, *(0,) * len(sub)), (full_end - first, *sub)))
    if stop % inner and stop > head_end:
        blocks += [((full_end, *idx), (1, *blk)) for idx, blk in flat_range_blocks(sub, 0, stop % inner)]
    return blocks


# --- the distributed optimizer's parameter state -----------------------------------------------------------------


def _param_ranges(inner) -> Iterable[Tuple[torch.nn.Parameter, int, int]]:
    for gbuf_range_maps in inner.gbuf_ranges:
        for range_maps in gbuf_range_maps.values():
            for range_map in range_maps:
                for model_param, ranges in range_map["param_map"].items():
                    yield model_param, ranges["param"].start, ranges["param"].end


def distributed_optimizer_state(optimizer, names: Dict[int, str]) -> Dict[str, object]:
    """{key: ShardedTensor or list of them} over this rank's optimizer-state tensors (used to save and to load)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out: Dict[str, object] = {}
    for i, inner in enumerate(_inner_optimizers(optimizer)):
        for model_param, start, stop in _param_ranges(inner):
            name = names[id(model_param)]
            view, glob, offset = placement(name, tuple(model_param.shape), tp, tp_rank)
            split = glob != view
            tensors = inner._get_main_param_and_optimizer_states(model_param)
            for state_key in STATE_KEYS:
                flat = tensors[state_key].view(-1)
                key, blocks, at = f"optimizer.state.{state_key}.{MODEL_PREFIX}{name}", [], 0
                for index, block in flat_range_blocks(view, start, stop):
                    numel = math.prod(block)
                    blocks.append(ShardedTensor(
                        key=key, data=flat[at:at + numel].view(block), dtype=flat.dtype, local_shape=block,
                        global_shape=glob, global_offset=tuple(o + x for o, x in zip(offset, index)),
                        axis_fragmentations=None, replica_id=(0, 0 if split else tp_rank, 0)))
                    at += numel
                out[f"{i}.{state_key}.{name}"] = blocks
    return out


def _optimizer_common(optimizer) -> list:
    return [inner.state_dict() for inner in _inner_optimizers(optimizer)]


def _load_optimizer_common(optimizer, common: list) -> None:
    inners = _inner_optimizers(optimizer)
    if len(common) != len(inners):
        raise CheckpointError(f"the checkpoint holds {len(common)} optimizer(s), this run has {len(inners)}.")
    for inner, state in zip(inners, common):
        inner.load_state_dict(state)
        # load_state_dict gives every parameter one shared `step` tensor; AdamW would advance it once per
        # parameter per step (see training/checkpointing.py).
        for param_state in inner.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()


# --- the whole training state ------------------------------------------------------------------------------------


def parameter_names(model) -> Dict[int, str]:
    return {id(p): name for name, p in model.predictor.state_dict(keep_vars=True).items()}


def training_state(model, optimizer, scheduler, iteration: int, consumed: int, is_loading: bool,
                   with_optimizer: bool, with_rng: bool) -> Dict[str, object]:
    """The sharded state dict of a training checkpoint (see the module docstring)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from ..checkpoint.stepvideo_sharded import dit_sharded_state_dict
    from .checkpointing import _rng_state

    model_state = dit_sharded_state_dict(model.predictor, prefix=MODEL_PREFIX)
    state: Dict[str, object] = {"model": model_state, "iteration": iteration, "consumed_samples": consumed,
                                "checkpoint_version": 3.0, "layout": layout(), "with_rng": with_rng}
    if with_optimizer:
        state["opt_param_scheduler"] = scheduler.state_dict()
        if uses_distributed_optimizer(optimizer):
            state["optimizer_common"] = _optimizer_common(optimizer)
            state["optimizer_param_state"] = distributed_optimizer_state(optimizer, parameter_names(model))
        else:
            state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", _rng_state() if not is_loading else None, (world,),
                                           (rank,), replica_id=0)
    return state


def _strategies(saving: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    if not saving:
        return None
    group = ps.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"), group)


def save_training_state(folder, model, optimizer, scheduler, iteration: int, consumed: int, with_optimizer: bool,
                        with_rng: bool, asynchronous: bool = False):
    """Every rank writes its part of the training state into `folder` (collective). With `asynchronous`, the
    tensors are staged in host memory here and the returned `AsyncRequest` writes them in the background."""
    from megatron.core import dist_checkpointing

    state = training_state(model, optimizer, scheduler, iteration, consumed, False, with_optimizer, with_rng)
    return dist_checkpointing.save(state, str(folder), sharded_strategy=_strategies(saving=True),
                                   async_sharded_save=asynchronous)


def load_training_state_dist(iter_dir, model, optimizer, scheduler, no_load_optim: bool, no_load_rng: bool,
                             log=print) -> Tuple[int, int]:
    """Restore optimizer, scheduler and RNG from a distributed checkpoint (the weights are loaded with the model);
    returns (iteration, consumed samples). Collective."""
    from megatron.core import dist_checkpointing

    from .checkpointing import _set_rng_state

    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    saved_layout, now = common.get("layout", {}), layout()
    with_optimizer = not no_load_optim
    if with_optimizer and "opt_param_scheduler" not in common:
        raise CheckpointError(f"{iter_dir} has no optimizer state (it was saved with --no-save-optim); resume with "
                              f"--no-load-optim, or --finetune to restart the schedule.")
    if with_optimizer and ("optimizer_common" in common) != uses_distributed_optimizer(optimizer):
        saved = "with" if "optimizer_common" in common else "without"
        raise CheckpointError(f"{iter_dir} was saved {saved} --use-distributed-optimizer; resume the same way, or "
                              f"with --no-load-optim.")
    with_rng = not no_load_rng and common.get("with_rng", False) and saved_layout == now
    if not no_load_rng and common.get("with_rng", False) and saved_layout != now:
        log(f"notice: the RNG states of {iter_dir} are not restored: saved at {saved_layout}, resumed at {now} "
            f"(noise and timesteps do not depend on them; only dropout inside tensor-parallel regions does).")
    if with_optimizer and uses_distributed_optimizer(optimizer):
        _load_optimizer_common(optimizer, common["optimizer_common"])  # allocates the states loaded below
    state = training_state(model, optimizer, scheduler, 0, 0, True, with_optimizer, with_rng)
    state.pop("model")  # the weights were read with the model (StepVideoDiT.from_pretrained)
    try:
        loaded = dist_checkpointing.load(state, str(iter_dir))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read the training state from the distributed checkpoint {iter_dir}: "
                              f"{exc}") from exc
    if with_optimizer:
        scheduler.load_state_dict(common["opt_param_scheduler"])
        if uses_distributed_optimizer(optimizer):
            _copy_blocks(state["optimizer_param_state"], loaded["optimizer_param_state"])
        else:
            optimizer.load_state_dict(loaded["optimizer"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    return int(common["iteration"]), int(common["consumed_samples"])


def _copy_blocks(requested: Dict[str, List], loaded: Dict[str, List]) -> None:
    """Put the loaded blocks into the optimizer-state views they were requested for (a no-op when the reader
    already filled them in place)."""
    with torch.no_grad():
        for key, blocks in requested.items():
            got = loaded[key]
            for block, value in zip(blocks, got if isinstance(got, list) else [got]):
                if block.data.data_ptr() != value.data_ptr():
                    block.data.copy_(value)

