"""The training loop shared by pretraining (t2v, i2v) and DPO: short and explicit.

    pretrain(argv)                 # pretrain_sora.py: spec.PRETRAIN
    pretrain(argv, spec.DPO)       # posttrain_dpo.py

Steps: flags and configs (validated before anything heavy) -> runtime (TP, CP, DP) -> the task's module and loss
function (its `TrainSpec`, `spec.py`; pretraining's in `builders.py`: the DiT, loaded strictly from --load or
predictor.from_pretrained, and what surrounds it)
-> Megatron DDP + (distributed) optimizer + LR schedule -> resume state -> data -> loop (micro-batches,
grad sync, step, log, save). This file holds the loop (`pretrain`) and `noise_generator`; the optimizer is built
in `optimizer.py`, the log line and the metrics are written by `metrics.py`.

Numerics: the loss of a micro-batch is the mean per-sample flow-matching loss, computed on the full
(context-parallel gathered) output on every CP rank; Megatron DDP averages gradients over data x context
parallel ranks, which the DiT's CP gradient scaling makes exact. t and the noise come from a generator
seeded by (seed, iteration, position of the micro-batch in the global batch): identical on the TP/CP
ranks that share a batch, independent of the data-parallel size, and reproducible on resume. With --fp16
each micro-batch loss is multiplied by the optimizer's loss scale before backward; the optimizer divides
the gradients by it, skips the step on an overflow and adjusts the scale (Megatron's scaler).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..arguments import parse_args, sequence_options
from .builders import params_dtype
from .builders import print_rank0 as _print
from .checkpointing import (
    check_shared_folder,
    is_complete_checkpoint,
    load_training_state,
    recover_interrupted_save,
    save_checkpoint,
)
from .metrics import MetricsLog, format_log_line, mean_over, report_skipped_rows
from .optimizer import build_optimizer
from .spec import PRETRAIN, TrainSpec


def noise_generator(seed: int, iteration: int, sample_slot: int) -> torch.Generator:
    """The generator of t, noise (and i2v pixel noise) for one micro-batch.

    `sample_slot` = micro-batch index x data-parallel size + data-parallel rank: the position of the
    micro-batch in the global batch, which is the same whatever the data-parallel size (Megatron's
    sampler gives DP rank r the r-th micro-batch of each group of DP micro-batches). So DP=2 with one
    micro-batch each draws exactly what one process with two micro-batches draws.
    """
    mixed = (seed * 1_000_003 + iteration) * 1_000_033 + sample_slot
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def pretrain(argv: Optional[Sequence[str]] = None, spec: TrainSpec = PRETRAIN) -> dict:
    """Run the task `spec` (default: pretraining); returns a summary (iteration, last loss, consumed samples).

    `spec.build(args)` gives the trained module, which maps (batch, generator) to its output and may carry
    `checkpoint_records` to save, and the loss function that maps that output to (per-sample loss, metrics).
    See the module docstring and `spec.py`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from ..data import build_dataloader, build_dataset, build_tokenizers
    from ..runtime import current_device, initialize_runtime
    from .profiling import TrainingProfiler

    args = parse_args(argv, entry=spec.entry)
    initialize_runtime(args.tensor_model_parallel_size, args.context_parallel_size,
                       args.pipeline_model_parallel_size, seed=args.seed, backend=args.distributed_backend,
                       timeout_minutes=args.distributed_timeout_minutes, sequence=sequence_options(args))
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.save and dist.get_rank() == 0:
        recover_interrupted_save(args.save, log=_print)  # before anything reads --load (often the same folder)
    dist.barrier()
    if args.save and dist.get_world_size() > 1:
        check_shared_folder(args.save)  # before hours of training, not at the first save
    profiler = TrainingProfiler.from_config(args.mm.tool, dist.get_rank(), current_device())  # checks its settings
    model, loss_fn = spec.build(args)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
                                               overlap_param_gather=args.overlap_param_gather,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    optimizer, scheduler = build_optimizer(args, ddp)
    iteration, consumed = 0, 0
    # The training state (optimizer, schedule, iteration) is where the trained weights are: --load, or for LoRA the
    # adapter checkpoint --lora-load (--load is then the frozen base).
    resume_dir = args.lora_load if args.lora_target_modules else args.load
    if resume_dir:
        iteration, consumed = load_training_state(
            resume_dir, optimizer, scheduler, args.use_distributed_optimizer, finetune=args.finetune,
            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, log=_print, model=model)
    start_iteration = iteration

    data_cfg = args.mm.data
    raw = data_cfg.dataset_param.dataset_type != "feature"
    dataset = build_dataset(data_cfg, tokenizers=build_tokenizers(data_cfg.dataset_param) if raw else None,
                            seed=args.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    loader = build_dataloader(dataset, data_cfg, dp_rank=dp_rank, dp_size=dp_size,
                              micro_batch_size=args.micro_batch_size, consumed_samples=consumed, seed=args.seed,
                              num_workers=args.num_workers)
    batches = iter(loader)
    metrics = MetricsLog(Path(args.save or "logs") / "metrics.jsonl", args.tensorboard_dir)
    dp_group = ps.get_data_parallel_group()
    skipped = nan_iters = 0
    skipped_rows, skipped_reported = {}, 0  # line -> reason, rows the data set replaced on this rank
    window_start, window_iters = time.time(), 0
    last_loss = math.nan
    # An iteration that the save folder already holds complete is not written again (nothing changed).
    saved_at = iteration if _same_folder(resume_dir, args.save) and is_complete_checkpoint(args.save, iteration) \
        else None
    records = getattr(model, "checkpoint_records", {})
    async_queue = None
    if args.async_save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()

    def save() -> None:
        if args.overlap_param_gather:  # the updated parameters are gathered by the next forward: gather them now
            ddp.disable_forward_pre_hook(param_sync=True)
        save_checkpoint(args.save, iteration, model, optimizer, scheduler, consumed, args.use_distributed_optimizer,
                        args.no_save_optim, args.no_save_rng, records=records, ckpt_format=args.ckpt_format,
                        async_queue=async_queue, log=_print)
        if args.overlap_param_gather:
            ddp.enable_forward_pre_hook()

    _print(f"training: iterations {iteration} -> {args.train_iters}, global batch {args.global_batch_size} = "
           f"micro-batch {args.micro_batch_size} x {args.num_micro_batches} micro-batches x data parallel {dp_size} "
           f"(TP {args.tensor_model_parallel_size}, CP {args.context_parallel_size}, {params_dtype(args)})")
    encode_in_group = getattr(model, "encodes_in_group", False)
    try:
        while iteration < args.train_iters:
            profiler.start_iteration()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses, extras = [], {}
            encoded = generators = None
            if encode_in_group:  # enable_encoder_dp: the iteration's micro-batches are encoded once per TP x CP group
                generators = [noise_generator(args.seed, iteration, micro * dp_size + dp_rank)
                              for micro in range(args.num_micro_batches)]
                encoded = model.encode_iteration([next(batches) for _ in generators], generators)
            for micro in range(args.num_micro_batches):
                batch = next(batches) if encoded is None else encoded[micro]
                for rows in batch.get("skipped_rows", ()):
                    skipped_rows.update((int(line), reason) for line, reason in rows)
                # With --overlap-grad-reduce the buckets are reduced during the last micro-batch's backward only.
                last = micro == args.num_micro_batches - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    out = ddp(batch, noise_generator(args.seed, iteration, micro * dp_size + dp_rank)
                              if generators is None else generators[micro])
                    loss, extra = loss_fn(out)
                    # fp16: scaled by the optimizer's loss scale (1 otherwise); the optimizer unscales the gradients.
                    optimizer.scale_loss(loss.mean() / args.num_micro_batches).backward()
                losses.append(loss.detach().mean())
                for key, value in extra.items():
                    extras.setdefault(key, []).append(value.detach().float().mean())
            ddp.finish_grad_sync()
            if async_queue is not None:
                async_queue.maybe_finalize_async_calls(blocking=False)  # completes a save whose writes are done
            loss_scale = optimizer.get_loss_scale().item()  # the scale this step's gradients carry
            ok, grad_norm, _ = optimizer.step()
            iteration += 1
            consumed += args.global_batch_size
            profiler.step()
            if ok:
                scheduler.step(increment=1)
            else:
                skipped += 1
            last_loss = mean_over(losses, dp_group)
            if not math.isfinite(last_loss):
                nan_iters += 1
            window_iters += 1
            values = {"loss": last_loss, "learning_rate": optimizer.param_groups[0]["lr"],
                      "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                      "loss_scale": loss_scale, "consumed_samples": consumed}
            values.update({k: mean_over(v, dp_group) for k, v in extras.items()})
            metrics.write(iteration, values)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                elapsed_ms = (time.time() - window_start) * 1000.0 / window_iters
                _print(format_log_line(iteration, args.train_iters, consumed, elapsed_ms, values["learning_rate"],
                                       args.global_batch_size, last_loss, values["grad_norm"], skipped, nan_iters,
                                       loss_scale=loss_scale))
                skipped_reported = report_skipped_rows(skipped_rows, dp_group, skipped_reported)
                metrics.flush()
                window_start, window_iters = time.time(), 0
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                save()
                saved_at = iteration
        if args.save and saved_at != iteration:
            save()
        elif args.save and iteration == start_iteration:
            _print(f"iteration {iteration} is already saved complete in {args.save}; nothing to train or save "
                   f"(raise --train-iters to continue)")
        if async_queue is not None:
            async_queue.maybe_finalize_async_calls(blocking=True)
            async_queue.close()
        if args.overlap_param_gather:  # leave the module with its updated parameters (callers read them)
            ddp.disable_forward_pre_hook(param_sync=True)
    finally:
        profiler.close()
        metrics.close()
    return {"iteration": iteration, "loss": last_loss, "consumed_samples": consumed,
            "skipped_rows": len(skipped_rows)}
