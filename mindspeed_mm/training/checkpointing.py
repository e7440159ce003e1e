"""Training checkpoints in the Megatron legacy layout, written atomically, read strictly.

    <save>/latest_checkpointed_iteration.txt       the last complete iteration
    <save>/iter_0000100/mp_rank_XX/model_optim_rng.pt
        {"model": DiT state dict (MindSpeed-MM names), "iteration", "consumed_samples", "checkpoint_version": 3.0,
         "optimizer", "opt_param_scheduler" (unless --no-save-optim), "rng_state" (unless --no-save-rng)}
    <save>/iter_0000100/mp_rank_XX/distrib_optim.pt    the distributed optimizer's parameter state
    <save>/iter_0000100/<name>.json                    records of the run (e.g. dpo_reference.json)

A save never leaves the folder unusable, whenever the process is killed:

1. every rank writes into the hidden `.iter_N.tmp`;
2. if `iter_N` exists (the same iteration saved again), it is renamed to `.iter_N.old`;
3. `.iter_N.tmp` is renamed to `iter_N`;
4. the tracker is written to a temporary file and renamed over the old one;
5. `.iter_N.old` is deleted.

`recover_interrupted_save` (run on the save folder before a job reads or writes it) undoes what a kill left: a
`.iter_N.tmp` is deleted (it may be incomplete), a `.iter_N.old` is put back when `iter_N` is missing (a kill between
2 and 3; the tracker still names the complete old folder) and deleted otherwise. The model part is exactly what the
converter and `StepVideoDiT.from_pretrained` read.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.megatron_layout import (
    CHECKPOINT_FILENAME,
    RELEASE,
    CheckpointError,
    checkpoint_file,
    checkpoint_load_errors,
    iteration_dir,
    iteration_dir_name,
    rank_dir_name,
    read_tracker,
    torch_load,
    tracker_path,
)
from ..checkpoint.file_pages import FilePages

DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"
TRACKER_TMP_NAME = "latest_checkpointed_iteration.txt.tmp"
# distrib_optim.pt only: the weights of the iteration are in model_optim_rng.pt and can still be used.
_RESUME_FIX = ("Copy the checkpoint again from where it was saved, point --load at another complete iteration, or "
               "resume with --no-load-optim to keep only the weights of this iteration with a fresh optimizer.")


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
    # Copies: the loaded states are views of the mapped checkpoint file, which they would otherwise keep mapped.
    get_cuda_rng_tracker().set_states({name: value.clone() for name, value in state["tracker"].items()})


def recover_interrupted_save(save_dir, log=print) -> None:
    """Make `save_dir` consistent after a save that was killed at any step (see the module docstring).

    Call it on one rank, for a folder this job owns (its --save), before any rank reads or writes it.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return
    for tmp in sorted(save_dir.glob(".iter_*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}, left by an interrupted save")
    for old in sorted(save_dir.glob(".iter_*.old")):
        final = save_dir / old.name[1:-len(".old")]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between moving the old copy away and moving the new one in
            os.replace(old, final)
            log(f"restored {final} from {old.name}, left by an interrupted save")
    stale = save_dir / f".{TRACKER_TMP_NAME}"
    if stale.exists():
        stale.unlink()


def is_complete_checkpoint(save_dir, iteration: int) -> bool:
    """True when the tracker of `save_dir` names `iteration` and its folder exists (the tracker is written last)."""
    try:
        return read_tracker(save_dir) == iteration and (Path(save_dir) / iteration_dir_name(iteration)).is_dir()
    except CheckpointError:
        return False


def save_checkpoint(save_dir, iteration: int, model, optimizer, scheduler, consumed_samples: int,
                    use_distributed_optimizer: bool, no_save_optim: bool = False, no_save_rng: bool = False,
                    records: Optional[Dict[str, dict]] = None, ckpt_format: str = "torch", async_queue=None,
                    log=print) -> Path:
    """Save iteration `iteration` (collective: every rank calls it).

    `records`: {name: JSON-able dict} written by rank 0 as `<iter>/<name>.json` (e.g. the DPO reference).
    `ckpt_format`: "torch" (the legacy layout above) or "torch_dist" (`training/dist_checkpoint.py`); both go
    through the same hidden folder, renames and tracker, so a kill is repaired the same way.
    `async_queue` (torch_dist, --async-save): a Megatron-core `AsyncCallsQueue`; the tensors are written by background
    processes and the renames and tracker happen when the queue finalizes the save (the caller polls it).
    """
    if async_queue is not None:  # one save in flight at a time: the previous one completes first
        async_queue.maybe_finalize_async_calls(blocking=True)
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    tmp = save_dir / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        recover_interrupted_save(save_dir, log=log)
        tmp.mkdir()
        for name, record in (records or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(record, indent=2))
    dist.barrier()
    try:
        check_shared_folder(save_dir, probe=tmp)
    except CheckpointError:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    def complete() -> None:  # every rank has written its part: move the folder in, then the tracker
        dist.barrier()
        if dist.get_rank() == 0:
            old = save_dir / f".{final.name}.old"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            tracker_tmp = save_dir / f".{TRACKER_TMP_NAME}"
            tracker_tmp.write_text(str(iteration))
            os.replace(tracker_tmp, tracker_path(save_dir))
            if old.exists():
                shutil.rmtree(old)
            log(f"saved checkpoint of iteration {iteration} to {final}")
        dist.barrier()

    if ckpt_format == "torch_dist":
        from .dist_checkpoint import save_training_state

        request = save_training_state(tmp, model, optimizer, scheduler, iteration, consumed_samples,
                                      with_optimizer=not no_save_optim, with_rng=not no_save_rng,
                                      asynchronous=async_queue is not None)
        if request is not None:
            request.add_finalize_fn(complete)
            async_queue.schedule_async_request(request)
            return final
    else:
        _save_legacy(tmp, model, optimizer, scheduler, iteration, consumed_samples, use_distributed_optimizer,
                     no_save_optim, no_save_rng)
    complete()
    return final


def _visible(path: Path, wait_s: float) -> bool:
    """Whether `path` exists here, waiting up to `wait_s` for a shared file system (NFS caches directory lookups)."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def check_shared_folder(folder, probe: Optional[Path] = None, wait_s: Optional[float] = None) -> None:
    """Raise on every rank unless all ranks see `probe` (default: a file rank 0 writes in `folder` now), waiting up
    to `wait_s` (default: $MINDSPEED_MM_SHARED_FS_WAIT_S, else 30 s) for the file system to show it.

    Collective. The writers of all TP ranks put their files in the same hidden folder and rank 0 renames it: on a
    --save folder the nodes do not share, another node's shard would go to a hidden folder of that node (mkdir
    creates it there) and never be renamed, while rank 0's tracker named an iteration without it.
    """
    folder = Path(folder)
    if wait_s is None:
        wait_s = float(os.environ.get("MINDSPEED_MM_SHARED_FS_WAIT_S", "30"))
    own_probe = probe is None
    if own_probe:
        token = [os.urandom(8).hex() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        probe = folder / f".shared-check-{token[0]}"
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
        dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (_visible(probe, wait_s), socket.gethostname(), str(folder.resolve())))
    if own_probe and dist.get_rank() == 0:
        probe.unlink()
    blind = [(rank, host, path) for rank, (visible, host, path) in enumerate(seen) if not visible]
    if not blind:
        return
    shown = "; ".join(f"rank {rank} on {host} looked in {path}" for rank, host, path in blind[:4])
    more = f"; and {len(blind) - 4} more rank(s)" if len(blind) > 4 else ""
    raise CheckpointError(
        f"--save {folder} is not shared by all ranks: rank 0 on {seen[0][1]} wrote {probe.name} in {seen[0][2]}, "
        f"but {len(blind)} rank(s) cannot see it after {wait_s:.0f} s ({shown}{more}). Every rank writes its part "
        f"of a checkpoint there and rank 0 completes it, so --save (SAVE_PATH) must be one folder that every node "
        f"mounts at the same path (see docs/multinode.md).")


def _save_legacy(tmp: Path, model, optimizer, scheduler, iteration: int, consumed_samples: int,
                 use_distributed_optimizer: bool, no_save_optim: bool, no_save_rng: bool) -> None:
    """mp_rank_XX/model_optim_rng.pt by data-parallel rank 0 of each TP rank, and distrib_optim.pt."""
    from megatron.core import parallel_state as ps

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


def read_record(load_dir, name: str) -> Optional[dict]:
    """The `<name>.json` record of the tracked iteration of `load_dir`, or None when it has none."""
    path = iteration_dir(load_dir) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint record is damaged.") from exc


def load_training_state(load_dir, optimizer, scheduler, use_distributed_optimizer: bool, finetune: bool = False,
                        no_load_optim: bool = False, no_load_rng: bool = False, log=print,
                        model=None) -> Tuple[int, int]:
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
    from ..checkpoint.dist_format import is_dist_checkpoint

    if is_dist_checkpoint(iteration_dir(load_dir, iteration)):  # any TP/DP layout: read resharded
        from .dist_checkpoint import load_training_state_dist

        iteration, consumed = load_training_state_dist(iteration_dir(load_dir, iteration), model, optimizer,
                                                       scheduler, no_load_optim, no_load_rng, log=log)
        log(f"resumed from {load_dir} at iteration {iteration} ({consumed} samples consumed)")
        return iteration, consumed
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    path = checkpoint_file(load_dir, tp_rank, tp, iteration)
    # Mapped, not read: the model weights beside the optimizer state were loaded already (from_pretrained) and
    # are not read again; what is used is copied out below and its pages given back.
    payload = torch_load(path, mmap=True)
    pages = FilePages(path)
    consumed = int(payload.get("consumed_samples", 0))
    if no_load_optim:
        log(f"--no-load-optim: resuming at iteration {iteration} with a fresh optimizer")
    else:
        missing = [k for k in ("optimizer", "opt_param_scheduler") if k not in payload]
        if missing:
            raise CheckpointError(f"{path} has no {' or '.join(missing)} state (it was saved with --no-save-optim); "
                                  f"resume with --no-load-optim, or --finetune to restart the schedule.")
        optimizer.load_state_dict(payload["optimizer"])
        # Nothing has written to the mapping: what Megatron copied (the fp32 main weights) is given back now, and
        # the moments the optimizer kept as views are still unread; then they get memory of their own.
        pages.release_all(payload["optimizer"])
        _own_optimizer_state(optimizer, pages)
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


def _own_optimizer_state(optimizer, pages: FilePages) -> None:
    """Give the optimizer its own copy of each state tensor it kept from the mapped checkpoint file.

    torch's `Optimizer.load_state_dict` keeps a loaded tensor as it is when its dtype and device already match, so
    the Adam moments would stay views of the file's private mapping until the first step writes them (copy on
    write): a file rewritten in place in that window would change them, and the file would stay mapped for the
    whole run. They are copied one at a time, each tensor's file pages given back after its copy."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            for key, value in list(state.items()):
                if torch.is_tensor(value) and pages.holds(value):
                    state[key] = value.clone()
                    pages.release(value)


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
        # Megatron does its own torch.load: name the file when it is damaged or refused.
        with checkpoint_load_errors(path, fix=_RESUME_FIX), torch.no_grad():  # fp32: main params require grad
            optimizer.load_parameter_state(str(path))
    finally:
        for state, step in steps:
            state["step"] = step.clone()
