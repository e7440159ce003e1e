"""Training checkpoints in the Megatron legacy layout, written atomically, read strictly.

    <save>/latest_checkpointed_iteration.txt       the last complete iteration
    <save>/iter_0000100/mp_rank_XX/model_optim_rng.pt
        {"model": DiT state dict (MindSpeed-MM names), "iteration", "consumed_samples", "checkpoint_version": 3.0,
         "optimizer", "opt_param_scheduler" (unless --no-save-optim), "rng_state" (unless --no-save-rng)}
    <save>/iter_0000100/mp_rank_XX/distrib_optim.pt    the distributed optimizer's parameter state

An iteration is written into a hidden temporary folder and renamed into place by rank 0 once every rank
has finished; only then is the tracker updated (also by rename). A crash mid-save leaves the previous
checkpoint and tracker untouched. The model part is exactly what the converter and
`StepVideoDiT.from_pretrained` read.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.megatron_layout import (
    CHECKPOINT_FILENAME,
    RELEASE,
    CheckpointError,
    checkpoint_file,
    iteration_dir_name,
    rank_dir_name,
    read_tracker,
    torch_load,
    tracker_path,
)

DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"


def _rng_state() -> dict:
    """This rank's RNG states, in types that torch.load(weights_only=True) accepts."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"random": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(save_dir, iteration: int, model, optimizer, scheduler, consumed_samples: int,
                    use_distributed_optimizer: bool, no_save_optim: bool = False, no_save_rng: bool = False,
                    log=print) -> Path:
    """Save iteration `iteration` (collective: every rank calls it)."""
    from megatron.core import parallel_state as ps

    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    tmp = save_dir / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    rank_dir = tmp / rank_dir_name(ps.get_tensor_model_parallel_rank())
    writer = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    if writer:
        rank_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict_for_save_checkpoint(), "iteration": iteration,
                 "consumed_samples": consumed_samples, "checkpoint_version": 3.0}
        if not no_save_optim:
            state["optimizer"] = optimizer.state_dict()
            state["opt_param_scheduler"] = scheduler.state_dict()
        if not no_save_rng:
            state["rng_state"] = _rng_state()
        torch.save(state, rank_dir / CHECKPOINT_FILENAME)
    dist.barrier()
    if use_distributed_optimizer and not no_save_optim:
        # Collective over the data x context parallel group; its rank 0 (the writer above) writes.
        optimizer.save_parameter_state(str(rank_dir / DISTRIB_OPTIM_FILENAME))
    dist.barrier()
    if dist.get_rank() == 0:
        old = None
        if final.exists():
            old = save_dir / f".{final.name}.old"
            os.replace(final, old)
        os.replace(tmp, final)
        tracker_tmp = save_dir / ".latest_checkpointed_iteration.txt.tmp"
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, tracker_path(save_dir))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log(f"saved checkpoint of iteration {iteration} to {final}")
    dist.barrier()
    return final


def load_training_state(load_dir, optimizer, scheduler, use_distributed_optimizer: bool, finetune: bool = False,
                        no_load_optim: bool = False, no_load_rng: bool = False, log=print) -> Tuple[int, int]:
    """Restore optimizer, scheduler and RNG from `load_dir`'s tracked iteration; returns (iteration, consumed).

    The model weights are loaded before the optimizer is built (`StepVideoDiT.from_pretrained`), so the
    optimizer's main parameters start from them. A `release` checkpoint (from the converter), or
    --finetune, starts at iteration 0 with a fresh optimizer.
    """
    from megatron.core import parallel_state as ps

    iteration = read_tracker(load_dir)
    if iteration == RELEASE or finetune:
        why = "a release checkpoint" if iteration == RELEASE else "--finetune"
        log(f"starting at iteration 0 with a fresh optimizer ({why}: only the model weights of {load_dir} are used)")
        return 0, 0
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    path = checkpoint_file(load_dir, tp_rank, tp, iteration)
    payload = torch_load(path)
    consumed = int(payload.get("consumed_samples", 0))
    if no_load_optim:
        log(f"--no-load-optim: resuming at iteration {iteration} with a fresh optimizer")
    else:
        missing = [k for k in ("optimizer", "opt_param_scheduler") if k not in payload]
        if missing:
            raise CheckpointError(f"{path} has no {' or '.join(missing)} state (it was saved with --no-save-optim); "
                                  f"resume with --no-load-optim, or --finetune to restart the schedule.")
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["opt_param_scheduler"])
        if use_distributed_optimizer:
            dist_path = path.parent / DISTRIB_OPTIM_FILENAME
            if not dist_path.is_file():
                raise CheckpointError(f"{dist_path} is missing: the checkpoint was not saved with "
                                      f"--use-distributed-optimizer. Resume without that flag, or with "
                                      f"--no-load-optim.")
            _load_distributed_parameter_state(optimizer, dist_path)
    if not no_load_rng and "rng_state" in payload:
        _set_rng_state(payload["rng_state"])
    log(f"resumed from {path.parent.parent} at iteration {iteration} ({consumed} samples consumed)")
    return int(iteration), consumed


def _load_distributed_parameter_state(optimizer, path: Path) -> None:
    """`optimizer.load_parameter_state`, working around Megatron-core 0.16 with torch's AdamW.

    Without Apex or Transformer Engine the inner optimizer is torch's AdamW, whose per-parameter state
    holds a "step" tensor. `load_state_dict` sets it (from the saved param groups), but
    `load_parameter_state` then copies every state key from the file, which has no "step", and fails
    with KeyError('step'). The steps are set aside for that call and put back, each as its own tensor:
    `load_state_dict` hands every parameter the same step tensor, which AdamW would then advance once per
    parameter per step (so bias correction would run ahead after a resume).
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    steps = []
    for inner in inners:
        for state in inner.optimizer.state.values():
            if "step" in state:
                steps.append((state, state.pop("step")))
    try:
        with torch.no_grad():  # fp32 runs: the main parameters are the model's, which require grad
            optimizer.load_parameter_state(str(path))
    finally:
        for state, step in steps:
            state["step"] = step.clone()
