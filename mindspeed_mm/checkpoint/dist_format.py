"""Megatron-core distributed checkpoints (`--ckpt-format torch_dist`): the parts that read and write the DiT.

    <save>/latest_checkpointed_iteration.txt     as in the legacy layout, written last
    <save>/iter_0000100/                         one torch.distributed.checkpoint folder: metadata.json, .metadata,
                                                 __<rank>_<i>.distcp files (every rank writes its own), common.pt

Model tensors are stored under `model.<our state-dict name>` with their global shapes (see
`models/predictor/stepvideo/sharded_state_dict.py`), so any TP or DP layout can read them: loading reshards. The
training loop adds the optimizer, scheduler, RNG and counters (`training/dist_checkpoint.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from .megatron_layout import CheckpointError

MODEL_PREFIX = "model."
FORMAT_NAME = "torch_dist"


def is_dist_checkpoint(iter_dir) -> bool:
    """True when `iter_dir` (release/ or iter_XXXXXXX/) holds a distributed checkpoint."""
    return (Path(iter_dir) / "metadata.json").is_file()


def _initialised() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise CheckpointError("reading a torch_dist checkpoint needs torch.distributed (call initialize_runtime).")


def load_dit_weights(model: torch.nn.Module, iter_dir) -> None:
    """Read this rank's part of every DiT tensor from `iter_dir` straight into `model` (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from .stepvideo_sharded import dit_sharded_state_dict

    _initialised()
    sharded = dit_sharded_state_dict(model, prefix=MODEL_PREFIX)
    try:
        # "missing": in the checkpoint, not in the model; "unexpected": wanted by the model, not in the checkpoint.
        loaded, missing, unexpected = dist_checkpointing.load(sharded, str(iter_dir), strict=StrictHandling.RETURN_ALL)
    except CheckpointError:
        raise
    except Exception as exc:  # the torch DCP reader raises CheckpointException, KeyError or RuntimeError
        raise CheckpointError(f"cannot read the DiT from the distributed checkpoint {iter_dir}: {exc}") from exc
    extra = sorted(k[len(MODEL_PREFIX):] for k in missing if k.startswith(MODEL_PREFIX))
    if extra or unexpected:
        absent = sorted(k[len(MODEL_PREFIX):] for k in unexpected)
        raise CheckpointError(
            f"Cannot load the StepVideo DiT strictly from {iter_dir} (distributed checkpoint): "
            + (f"{len(absent)} missing key(s): {absent[:10]}. " if absent else "")
            + (f"{len(extra)} unexpected key(s): {extra[:10]}. " if extra else "")
            + "Make the predictor config match the checkpoint (layer count, t2v vs i2v).")
    _copy_into(model, {k[len(MODEL_PREFIX):]: v for k, v in loaded.items() if k in sharded}, iter_dir)


def _copy_into(model: torch.nn.Module, tensors: Dict[str, torch.Tensor], source) -> None:
    own = model.state_dict(keep_vars=True)
    absent = sorted(set(own) - set(tensors))
    if absent:
        raise CheckpointError(f"{source} has no tensor for {absent[:10]} (of {len(absent)}); it was saved from "
                              f"another model configuration.")
    with torch.no_grad():
        for name, target in own.items():
            value = tensors[name]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)} for this rank, the model "
                                      f"{tuple(target.shape)}.")
            target.copy_(value)


def read_full_model(iter_dir) -> Dict[str, torch.Tensor]:
    """Every DiT tensor of `iter_dir` at its full (TP=1) shape, our names: what the converter merges and exports.

    Only the model's tensors are read, not the optimizer's. Needs torch.distributed (one process is enough).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from .stepvideo_layout import plan_for_parameter

    _initialised()
    metadata = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    wanted = {}
    for key, meta in metadata.items():
        if key.startswith(MODEL_PREFIX):
            empty = torch.empty(meta.global_shape, dtype=meta.dtype)
            wanted[key] = ShardedTensor.from_rank_offsets(key, empty, replica_id=0)
    if not wanted:
        raise CheckpointError(f"{iter_dir} is a distributed checkpoint without model tensors ('{MODEL_PREFIX}*').")
    loaded = dist_checkpointing.load(wanted, str(iter_dir), validate_access_integrity=False)
    out = {}
    for key, tensor in loaded.items():
        if key not in wanted:  # the common state (iteration, ...) comes back too
            continue
        name = key[len(MODEL_PREFIX):]
        plan, leaf = plan_for_parameter(name)
        if plan is not None and plan.fused > 1 and leaf in ("weight", "bias"):
            tensor = tensor.reshape(-1, *tensor.shape[2:])  # (parts, rows, ...) -> [P0; P1; ...]
        out[name] = tensor
    return out
