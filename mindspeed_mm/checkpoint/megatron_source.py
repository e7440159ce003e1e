"""Reading a Megatron-layout checkpoint (release or iter_*, any TP x PP, legacy rank files or torch_dist) back into
one full state dict in our key names: `read_megatron_full`, used by the converter's merge and export and by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import stepvideo_adapter as adapter
from .conversion_checks import BLOCK_KEY, ConversionError, listing, print_log
from .dist_format import is_dist_checkpoint, read_full_model
from .megatron_layout import (
    CHECKPOINT_FILENAME,
    CheckpointError,
    iteration_dir,
    parallel_sizes,
    read_tracker,
    scan_rank_dirs,
    torch_load,
)

_RANK_FILE_FIX = ("Copy the checkpoint again from where it was saved, or point --source_path at another complete "
                  "checkpoint (an earlier iter_XXXXXXX of the same run, or a fresh conversion).")


def _load_rank(path: Path, log) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete.")
    payload = torch_load(path, fix=_RANK_FILE_FIX)
    if not isinstance(payload, dict) or "model" not in payload:
        found = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has no 'model' entry (found {found}); expected torch.save({{'model': ...}}).")
    ignored = sorted(k for k in payload if k not in ("model", "checkpoint_version", "iteration", "args"))
    if ignored:
        log(f"notice: {path}: ignoring {', '.join(ignored)} (only model weights are converted)")
    return payload["model"]


def _place_shard(full: torch.Tensor, key: str, shard: torch.Tensor, tp_rank: int, tp: int) -> None:
    """Copy TP rank `tp_rank`'s part into the preallocated full tensor (inverse of shard_tensor)."""
    dim = next(d for d in range(full.dim()) if full.shape[d] != shard.shape[d])
    probe_shape = [1] * full.dim()
    probe_shape[dim] = full.shape[dim]
    probe = torch.arange(full.shape[dim]).view(probe_shape)
    index = adapter.shard_tensor(key, probe, tp_rank, tp).flatten()
    full.index_copy_(dim, index, shard)


def read_megatron_full(source_path, log=print_log) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Every rank of a Megatron-layout checkpoint merged into one full state dict (our names).

    Rank files are read one at a time; each TP shard is copied into a preallocated full tensor,
    so memory stays near one copy of the model plus one rank file.
    """
    source = Path(source_path)
    if not source.exists():
        raise ConversionError(f"--source_path {source} does not exist; point it at a converted or trained checkpoint "
                              f"folder (the one holding latest_checkpointed_iteration.txt).")
    iteration = read_tracker(source)
    iter_dir = iteration_dir(source, iteration)
    if is_dist_checkpoint(iter_dir):
        return _read_dist_full(iter_dir, iteration, log)
    tp, pp = parallel_sizes(iter_dir)
    rank_dirs = scan_rank_dirs(iter_dir)
    log(f"reading {iter_dir}: TP {tp}, PP {pp}")
    full: Dict[str, torch.Tensor] = {}
    block_offset = 0
    for pp_rank in range(pp):
        stage_keys: Optional[set] = None
        for tp_rank in range(tp):
            path = rank_dirs[(tp_rank, None if pp == 1 else pp_rank)] / CHECKPOINT_FILENAME
            state = _load_rank(path, log)
            if stage_keys is None:
                stage_keys = set(state)
                blocks = {int(m.group(1)) for k in state if (m := BLOCK_KEY.match(k))}
                if blocks != set(range(len(blocks))):
                    raise ConversionError(f"{path}: blocks {sorted(blocks)} are not numbered 0..{len(blocks) - 1}.")
                stage_layers = len(blocks)
            elif set(state) != stage_keys:
                raise ConversionError(f"{path} holds different keys than TP rank 0 of its stage: "
                                      f"{listing(set(state) ^ stage_keys)}")
            for key in list(state):
                shard = state.pop(key)
                m = BLOCK_KEY.match(key)
                full_key = f"transformer_blocks.{int(m.group(1)) + block_offset}.{m.group(2)}" if m else key
                shape = adapter.full_shape(full_key, shard.shape, tp)
                if tuple(shape) != tuple(shard.shape):  # split over TP: copy this rank's part in place
                    if tp_rank == 0:
                        full[full_key] = torch.empty(shape, dtype=shard.dtype)
                    _place_shard(full[full_key], full_key, shard, tp_rank, tp)
                elif full_key not in full:
                    full[full_key] = shard
                elif not torch.equal(full[full_key], shard):
                    where = f"TP rank {tp_rank}" + (f", PP rank {pp_rank}" if pp > 1 else "")
                    raise ConversionError(
                        f"{full_key} is replicated but {where} ({path}) holds different values than the rank read "
                        f"first; the ranks of this checkpoint diverged, so no merge of it is faithful."
                    )
            del state
        block_offset += stage_layers
    return full, {"iteration": iteration, "tp": tp, "pp": pp}


def _read_dist_full(iter_dir: Path, iteration, log) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A distributed (torch_dist) training checkpoint: its model tensors at full size, read in one process."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from ..runtime import destroy_runtime, initialize_runtime

    owns_runtime = not dist.is_initialized()  # reading goes through torch.distributed, one process is enough
    if owns_runtime:
        initialize_runtime(seed=0)
    try:
        full = read_full_model(iter_dir)
        tp = dist_checkpointing.load_common_state_dict(str(iter_dir)).get("layout", {}).get("tp", 1)
    finally:
        if owns_runtime:
            destroy_runtime()
    log(f"reading {iter_dir}: distributed checkpoint saved at TP {tp}")
    return full, {"iteration": iteration, "tp": tp, "pp": 1}
