"""The DPO task: the actor, its frozen reference, and where the reference comes from.

The reference must be the weights the DPO run started from, for the whole run. Which path that is:

1. `dpo.reference_path` in the model JSON, when set;
2. on a resumed run (--load names an iteration, no --finetune): the path recorded in that checkpoint's
   `dpo_reference.json`. Resuming from `--load <save dir>` must never make the actor at step N its own reference
   (the loss would be log 2 forever and nothing would be learnt);
3. on a fresh run: the weights the actor starts from, `--load`, else `predictor.from_pretrained`.

Every save records the reference's path, its tracker iteration and a fingerprint of its weights (per TP rank: the
float64 sum and sum of squares of its tensors); a resumed run compares the reference it loaded with the record and
stops with an error naming both when they differ.

LoRA-DPO (--lora-target-modules): the reference is the actor's frozen base with the adapters off, so only one DiT is
loaded. The base is what --load (or predictor.from_pretrained) names, on a fresh run and on a resumed one alike (a
LoRA run resumes from --lora-load); its record and fingerprint are kept and checked as above. An adapter from LoRA
pretraining is not a starting point for LoRA-DPO (the reference would not be the weights the run starts from): merge
it into the base first (the converter's --lora-load) and use the merged checkpoint as --load.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional

import torch
import torch.distributed as dist

from ..arguments import ArgumentError
from ..checkpoint.megatron_layout import RELEASE, CheckpointError, is_megatron_checkpoint, read_tracker
from .builders import (LORA_RECORD, build_encoders, build_predictor, caption_dropout_options, check_training_sections,
                       encoder_dp_options, load_dit, print_rank0)
from .checkpointing import read_record

RECORD_NAME = "dpo_reference"
_FINGERPRINT_RTOL = 1e-6  # float64 sums of the same weights agree to ~1e-12; a changed weight moves them more
_FINGERPRINT_CHUNK = 1 << 22


def _resuming(args) -> bool:
    if not args.load or args.finetune or not is_megatron_checkpoint(args.load):
        return False
    return read_tracker(args.load) != RELEASE


def _tracker_iteration(path: str):
    return read_tracker(path) if is_megatron_checkpoint(path) else None


def resolve_reference_path(args) -> tuple:
    """(reference path, the record of the resumed checkpoint or None, how the path was chosen)."""
    dpo = args.mm.model.dpo
    recorded = read_record(args.load, RECORD_NAME) if _resuming(args) else None
    if dpo.reference_path:
        return dpo.reference_path, recorded, f"dpo.reference_path in {args.mm_model}"
    if recorded is not None:
        if not os.path.exists(recorded["path"]):
            raise CheckpointError(
                f"the DPO reference recorded in {args.load} ({RECORD_NAME}.json), {recorded['path']}, does not "
                f"exist any more. Set dpo.reference_path in {args.mm_model} to where that checkpoint is now.")
        return recorded["path"], recorded, f"recorded in the checkpoint {args.load}"
    if _resuming(args):
        raise CheckpointError(
            f"--load {args.load} is iteration {read_tracker(args.load)} of a run that recorded no DPO reference "
            f"(a pretraining run, or a DPO run saved by an older version). Resuming it would make the actor its own "
            f"reference. To start DPO from these weights, add --finetune (they become the reference); to resume an "
            f"older DPO run, set dpo.reference_path in {args.mm_model} to the checkpoint that run started from.")
    source = args.load or args.mm.model.predictor.from_pretrained
    if not source:
        raise ArgumentError(f"DPO needs a reference DiT: set --load (LOAD_PATH) or predictor.from_pretrained in "
                            f"{args.mm_model}, or dpo.reference_path.")
    return source, None, "the weights this run starts from"


def fingerprint(module: torch.nn.Module) -> List[float]:
    """[sum, sum of squares] of this rank's tensors (LoRA adapters excluded: the base's), in float64."""
    from ..models.lora import LORA_SUFFIXES

    total = squares = 0.0
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not key.endswith(LORA_SUFFIXES):
                flat = tensor.detach().reshape(-1)
                # In chunks: a whole real-width tensor in float64 is 4x its bf16 size on top of two loaded DiTs.
                for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
                    t = flat[start:start + _FINGERPRINT_CHUNK].double()
                    total += t.sum().item()
                    squares += t.square().sum().item()
    return [total, squares]


def _gather_over_tp(value) -> list:
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _same(a: List[List[float]], b: List[List[float]]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=_FINGERPRINT_RTOL, abs_tol=1e-9)
                                    for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def check_reference(record: Optional[dict], current: dict, load: str) -> None:
    """Raise when the reference loaded now is not the one the resumed run was trained against."""
    if record is None:
        return
    if record.get("tp_size") != current["tp_size"]:
        return  # legacy checkpoints only resume at their own TP size; a converted reference is checked by path
    if not _same(record.get("fingerprint", []), current["fingerprint"]):
        raise CheckpointError(
            f"the DPO reference loaded from {current['path']} (iteration {current['iteration']}) has other weights "
            f"than the reference the run in {load} was trained against ({record.get('path')}, iteration "
            f"{record.get('iteration')}; see {RECORD_NAME}.json there). Point dpo.reference_path at that "
            f"checkpoint, or start a new DPO run with --finetune.")


def _reference_record(args, path: str, weights: torch.nn.Module, recorded: Optional[dict], load: str) -> dict:
    from megatron.core import parallel_state as ps

    record = {"path": os.path.abspath(path), "iteration": _tracker_iteration(path),
              "tp_size": ps.get_tensor_model_parallel_world_size(),
              "fingerprint": _gather_over_tp(fingerprint(weights))}
    check_reference(recorded, record, load)
    return record


def build_lora_actor(args):
    """LoRA-DPO: (the actor: the base from --load / predictor.from_pretrained with adapters, the reference record).
    The reference is that base with the adapters off (DPOLossModel with reference=None)."""
    base = args.load or args.mm.model.predictor.from_pretrained
    if not base:
        raise ArgumentError(f"LoRA-DPO needs the base DiT: set --load (LOAD_PATH) or predictor.from_pretrained in "
                            f"{args.mm_model}.")
    chosen = args.mm.model.dpo.reference_path
    if chosen and os.path.realpath(chosen) != os.path.realpath(base):
        raise ArgumentError(f"LoRA-DPO's reference is the base with the adapters off ({base}); dpo.reference_path "
                            f"{chosen} in {args.mm_model} names other weights. Drop dpo.reference_path, or run full "
                            f"DPO (without --lora-target-modules).")
    recorded = None
    if args.lora_load is not None:
        recorded = read_record(args.lora_load, RECORD_NAME)
        if recorded is None:
            raise ArgumentError(
                f"--lora-load {args.lora_load} is not a LoRA-DPO checkpoint (it has no {RECORD_NAME}.json): LoRA-DPO "
                f"compares the actor with its base, so it cannot start from another run's adapter. Merge that "
                f"adapter into the base (examples/stepvideo/convert_ckpt_to_mm.py --mode merge --lora-load "
                f"{args.lora_load}) and pass the merged checkpoint as --load.")
    actor = build_predictor(args)
    print_rank0(f"DPO reference: {base}, the actor's base with the LoRA adapters off (one DiT in memory)")
    record = _reference_record(args, base, actor, recorded, args.lora_load)
    record["lora"] = True
    return actor, record


def build_reference(args):
    """(the frozen reference DiT, the record to save with every checkpoint)."""
    path, recorded, why = resolve_reference_path(args)
    iteration = _tracker_iteration(path)
    print_rank0(f"DPO reference: {path}" + (f" (iteration {iteration})" if iteration is not None else "")
                + f", {why}")
    reference = load_dit(args, path, recompute=False)
    return reference, _reference_record(args, path, reference, recorded, args.load)


def build_actor(args, reference, record: dict):
    """The trained DiT. On a fresh run it starts from the checkpoint the reference was just loaded from: then it is
    a copy of the reference, so each rank reads that checkpoint once, not twice."""
    source = args.load or args.mm.model.predictor.from_pretrained
    same = bool(source) and os.path.realpath(source) == os.path.realpath(record["path"])
    return build_predictor(args, copy_of=reference if same else None)


def build_dpo_model(args):
    """DPOLossModel: the actor (from --load or predictor.from_pretrained) and its frozen reference."""
    from ..models.diffusion import FlowMatchScheduler
    from ..models.dpo_loss import DPOLossModel

    check_training_sections(args)
    model_cfg = args.mm.model
    dpo = model_cfg.dpo
    if dpo is None:
        raise ArgumentError(f"{args.mm_model} has no 'dpo' section (histogram_path, weight_alpha, weight_beta, "
                            f"loss_beta); DPO training needs it.")
    histogram = None
    if dpo.weight_alpha:
        from ..dpo.histogram import load_histogram

        histogram = load_histogram(dpo.histogram_path)
    if args.lora_target_modules:
        reference = None
        actor, record = build_lora_actor(args)
    else:
        reference, record = build_reference(args)
        actor = build_actor(args, reference, record)
    vae, encoder = build_encoders(args)
    model = DPOLossModel(actor, FlowMatchScheduler.from_config(model_cfg.diffusion), reference,
                         vae=vae, text_encoder=encoder, i2v=model_cfg.predictor.use_additional_conditions,
                         loss_beta=dpo.loss_beta, beta=args.dpo_beta, label_smoothing=args.dpo_label_smoothing,
                         pref_ftx=args.pref_ftx, histogram=histogram, weight_alpha=dpo.weight_alpha,
                         weight_beta=dpo.weight_beta, **encoder_dp_options(args, vae, encoder),
                         **caption_dropout_options(args, encoder))
    model.checkpoint_records[RECORD_NAME] = record
    if getattr(actor, "lora_record", None):
        model.checkpoint_records[LORA_RECORD] = actor.lora_record
    return model
