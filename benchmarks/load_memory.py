"""Peak host memory per rank while loading and saving the StepVideo DiT, at TP=2 on 2 gloo ranks.

    python benchmarks/load_memory.py                       # real width (48 heads x 128), 1 layer, bf16
    python benchmarks/load_memory.py --repo /tmp/before    # the same files, loaded by another checkout

Writes, once, with this checkout's tools: a random official transformer/ folder at real width (`dit_weights`), its
TP=2 Megatron split (`checkpoint.convert.split`) and, at a smaller width (--train-heads), a training checkpoint with
Adam state. Then each scenario runs in fresh `torchrun --nproc_per_node 2` processes that import `mindspeed_mm` from
--repo:

    official     StepVideoDiT.from_pretrained(official folder)
    megatron     StepVideoDiT.from_pretrained(the TP=2 split, release/)
    dpo          the DPO reference and actor from that same split (training/dpo.py, a fresh run)
    save         training.checkpointing.save_checkpoint of the loaded real-width DiT (legacy format, weights + RNG)
    train-save   save_checkpoint of a smaller DiT with its bf16 Adam state (Megatron's optimizer, one step taken)
    train-load   from_pretrained of that training checkpoint (weights beside 6x their size in optimizer state)
    resume       load_training_state of it (optimizer, scheduler, RNG)

and, for the smaller DiT with its Adam state under the distributed optimizer (--use-distributed-optimizer) on the 2
ranks as data parallel (TP=1 x DP=2; --dp-tp 2 runs TP=2 x DP=2 on 4 ranks), the save itself:

    dp-save-torch   save_checkpoint(ckpt_format="torch"): Megatron's save_parameter_state gathers the data-parallel
                    group's optimizer state on its rank 0, which writes distrib_optim.pt
    dp-save-dist    save_checkpoint(ckpt_format="torch_dist"): every rank writes its own shard (dist_checkpoint.py)
    dp-save-async   the same with an AsyncCallsQueue (--async-save): the tensors are staged here and written by a
                    forked process; measured up to the blocking finalize. The forked writer's peak RSS is printed
                    apart: an upper bound of what it adds, since it counts the parent's pages it reads

These print every rank, with its increase as a multiple of the state it holds (its bf16 weights, whole at TP=1, plus
its shard of the fp32 main weights and Adam moments) and of the whole optimizer state of its data-parallel group.

Measure: each rank resets its RSS high-water mark after imports and process-group set-up (`/proc/self/clear_refs`,
which resets both VmHWM and getrusage's ru_maxrss), notes its RSS as the baseline, runs the step, and reports
ru_maxrss minus the baseline. RSS counts the pages of memory-mapped files the process has touched as well as its own
memory, so reading a checkpoint through a map is charged like reading it into memory. The figures are given as
multiples of the rank's share of the weights (the bytes of its model state dict; for `resume`, of the optimizer
state it loads). Mean of the two ranks; they differ by a few MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
SCENARIOS = ("official", "megatron", "dpo", "save", "train-save", "train-load", "resume")
DP_SCENARIOS = ("dp-save-torch", "dp-save-dist", "dp-save-async")


# --- one rank (under torchrun) ----------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Reset the RSS high-water mark; returns the RSS now (the baseline)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _predictor_config(folder: Path):
    from mindspeed_mm.config.model import PredictorConfig
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    kwargs = adapter.predictor_kwargs_from_official_config(json.loads((folder / "config.json").read_text()), "")
    kwargs["channel_split"] = adapter.default_channel_split(kwargs["head_dim"])
    return PredictorConfig(**kwargs, dtype="bf16")


def _args(predictor, load: str):
    """The flags `training.builders`/`training.dpo` read, for a fresh bf16 run from `load`."""
    from types import SimpleNamespace

    from mindspeed_mm.config.model import DPOConfig

    mm = SimpleNamespace(model=SimpleNamespace(predictor=predictor, dpo=DPOConfig(histogram_path="unused")))
    return SimpleNamespace(mm=mm, mm_model="benchmark", load=load, finetune=False, bf16=True, fp16=False,
                           recompute_granularity=None, recompute_method=None, recompute_num_layers=None)


def _optimizer(dit, distributed: bool = False):
    """Megatron DDP and the training loop's optimizer (bf16 weights, fp32 main weights, Adam) with its state."""
    from types import SimpleNamespace

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mindspeed_mm.training.optimizer import build_optimizer

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)
    ddp = DistributedDataParallel(dit.config, ddp_config, dit)
    flags = SimpleNamespace(optimizer="adam", lr=1e-5, min_lr=0.0, weight_decay=0.01, adam_beta1=0.9,
                            adam_beta2=0.999, adam_eps=1e-8, sgd_momentum=0.9, clip_grad=1.0, bf16=True, fp16=False,
                            use_distributed_optimizer=distributed, loss_scale=None, initial_loss_scale=2**32,
                            min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2, lr_warmup_iters=0,
                            lr_warmup_fraction=None, lr_decay_iters=None, train_iters=10, lr_warmup_init=0.0,
                            lr_decay_style="constant")
    optimizer, scheduler = build_optimizer(flags, ddp)
    return ddp, optimizer, scheduler


def _optimizer_bytes(optimizer) -> int:
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:  # fp32 main weights
                total += param.numel() * param.element_size()
        for state in inner.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))
    return total


def run_rank(scenario: str, work: Path, out: Path) -> None:
    import torch.distributed as dist

    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_runtime
    from mindspeed_mm.training import checkpointing

    if scenario in DP_SCENARIOS:
        return run_dp_save(scenario, work, out)
    initialize_runtime(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    official, split, train = work / "transformer", work / "megatron_tp2", work / f"train_{os.environ['BENCH_LABEL']}"
    share = None
    if scenario in ("save", "train-save", "train-load", "resume"):
        source = split if scenario == "save" else train
        if scenario == "train-save":
            dit = StepVideoDiT.build(_predictor_config(work / "train_config"))
        elif scenario != "train-load":
            dit = StepVideoDiT.from_pretrained(source, dtype="bf16")
        if scenario in ("train-save", "resume"):
            ddp, optimizer, scheduler = _optimizer(dit)
            if scenario == "train-save":
                ddp.zero_grad_buffer()
                optimizer.step()  # allocates the Adam moments
    dist.barrier()
    baseline = _reset_peak()
    start = time.perf_counter()
    if scenario == "official":
        model = StepVideoDiT.from_pretrained(official, dtype="bf16")
    elif scenario in ("megatron", "train-load"):
        model = StepVideoDiT.from_pretrained(split if scenario == "megatron" else train, dtype="bf16")
    elif scenario == "dpo":
        from mindspeed_mm.training import dpo
        from mindspeed_mm.training.builders import build_predictor

        args = _args(_predictor_config(official), str(split))
        reference, record = dpo.build_reference(args)
        model = dpo.build_actor(args, reference, record) if hasattr(dpo, "build_actor") else build_predictor(args)
    elif scenario == "save":
        checkpointing.save_checkpoint(work / f"save_{os.environ['BENCH_LABEL']}", 1, dit, None, None, 0, False,
                                      no_save_optim=True, log=lambda m: None)
        model = dit
    elif scenario == "train-save":
        checkpointing.save_checkpoint(train, 1, dit, optimizer, scheduler, 8, False, log=lambda m: None)
        model = dit
        share = _optimizer_bytes(optimizer) + _nbytes(dit)
    elif scenario == "resume":
        checkpointing.load_training_state(train, optimizer, scheduler, False, log=lambda m: None)
        model = dit
        share = _optimizer_bytes(optimizer)
    seconds = time.perf_counter() - start
    dist.barrier()
    result = {"rank": rank, "growth": _peak() - baseline, "hwm_growth": _status("VmHWM") - baseline,
              "baseline": baseline, "weights": _nbytes(model), "state": share, "seconds": seconds}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def run_dp_save(scenario: str, work: Path, out: Path) -> None:
    """One save of the smaller DiT and its Adam state under the distributed optimizer (see the module docstring)."""
    import resource

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_runtime
    from mindspeed_mm.training import checkpointing

    initialize_runtime(tensor_model_parallel_size=int(os.environ["BENCH_TP"]))
    rank = dist.get_rank()
    class Model(torch.nn.Module):  # what the training loop saves: the DiT under `predictor` (models/diffusion_loss.py)
        def __init__(self, predictor):
            super().__init__()
            self.predictor, self.config = predictor, predictor.config

        def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
            return self.predictor.state_dict(prefix=prefix, keep_vars=keep_vars)

    dit = StepVideoDiT.build(_predictor_config(work / "train_config"))
    model = Model(dit)
    ddp, optimizer, scheduler = _optimizer(model, distributed=True)
    ddp.zero_grad_buffer()
    optimizer.step()  # allocates the Adam moments (of this rank's shard)
    own = _optimizer_bytes(optimizer)
    group = torch.tensor([own], dtype=torch.float64)
    dist.all_reduce(group, group=ps.get_data_parallel_group())
    queue = None
    if scenario == "dp-save-async":
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        queue = AsyncCallsQueue()
    folder = work / f"dpsave_{os.environ['BENCH_LABEL']}_{scenario}"
    dist.barrier()
    baseline = _reset_peak()
    start = time.perf_counter()
    checkpointing.save_checkpoint(folder, 1, model, optimizer, scheduler, 8, True,
                                  ckpt_format="torch" if scenario == "dp-save-torch" else "torch_dist",
                                  async_queue=queue, log=lambda m: None)
    returned = time.perf_counter() - start
    if queue is not None:
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    seconds = time.perf_counter() - start
    dist.barrier()
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {"rank": rank, "growth": _peak() - baseline, "hwm_growth": _status("VmHWM") - baseline,
              "baseline": baseline, "weights": _nbytes(dit), "state": own + _nbytes(dit), "optimizer": own,
              "group_optimizer": group.item(), "seconds": seconds, "returned": returned,
              "child_peak": child if queue is not None else None}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)


# --- the driver -------------------------------------------------------------------------------------


def write_inputs(work: Path, layers: int, heads: int, head_dim: int, train_heads: int, train_layers: int,
                 real_width: bool = True) -> None:
    """The official folder and its TP=2 split at real width (unless not `real_width`), and the config of the smaller
    training model."""
    import torch

    sys.path.insert(0, str(REPO))
    from mindspeed_mm.checkpoint.convert import split
    from mindspeed_mm.tiny.dit import official_config, write_tiny_dit

    common = dict(in_channels=64, caption_channels=(6144, 1024), dtype=torch.bfloat16, num_shards=4)
    if real_width and not (work / "transformer" / "config.json").is_file():
        start = time.perf_counter()
        write_tiny_dit(work / "transformer", num_layers=layers, num_heads=heads, head_dim=head_dim, **common)
        print(f"wrote the official folder ({time.perf_counter() - start:.0f} s)", flush=True)
    if real_width and not (work / "megatron_tp2").is_dir():
        split(work / "transformer", work / "megatron_tp2", tp_size=2, pp_layers=[layers], num_layers=layers,
              log=lambda m: None)
        print("wrote the TP=2 split", flush=True)
    folder = work / "train_config"
    folder.mkdir(parents=True, exist_ok=True)
    config = official_config(num_layers=train_layers, num_heads=train_heads, head_dim=head_dim, in_channels=64,
                             caption_channels=(6144, 1024))
    (folder / "config.json").write_text(json.dumps(config))


def run_scenario(scenario: str, work: Path, repo: Path, label: str, tp: int = 2) -> dict:
    """Mean of the ranks (and, under "ranks", each rank's result)."""
    out = work / f"result_{label}_{scenario}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    nproc = 2 * tp if scenario in DP_SCENARIOS else 2  # DP=2 x TP=tp, or TP=2
    env = dict(os.environ, PYTHONPATH=str(repo), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", BENCH_LABEL=label, BENCH_TP=str(tp))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--rank-scenario", scenario, "--workdir", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(work))
    if proc.returncode != 0:
        raise RuntimeError(f"{scenario} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    shutil.rmtree(out, ignore_errors=True)
    mean = {key: sum(r[key] for r in ranks) / nproc
            for key in ("growth", "hwm_growth", "baseline", "weights", "seconds")}
    for r in ranks:
        if abs(r["growth"] - r["hwm_growth"]) > 32 * 2**20:  # ru_maxrss also keeps the peak from before exec
            print(f"  note: rank {r['rank']}: ru_maxrss growth {r['growth'] / GiB:.2f} GiB, "
                  f"VmHWM growth {r['hwm_growth'] / GiB:.2f} GiB")
    mean["state"] = sum(r["state"] for r in ranks) / nproc if ranks[0]["state"] is not None else None
    mean["ranks"] = ranks
    return mean


def print_dp_save(scenario: str, r: dict) -> None:
    for rank in r["ranks"]:
        child = f"  (forked writer peak RSS {rank['child_peak'] / GiB:.2f} GiB; save returned after " \
                f"{rank['returned']:.1f}s)" if rank["child_peak"] is not None else ""
        print(f"{scenario:14s} {rank['rank']:4d} {rank['state'] / GiB:7.2f} GiB {rank['optimizer'] / GiB:7.2f} GiB "
              f"{rank['group_optimizer'] / GiB:7.2f} GiB {rank['growth'] / GiB:7.2f} GiB "
              f"{rank['growth'] / rank['state']:7.2f}x {rank['growth'] / rank['group_optimizer']:7.2f}x "
              f"{rank['seconds']:6.1f}s{child}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--train-heads", type=int, default=16, help="heads of the model saved with Adam state")
    parser.add_argument("--train-layers", type=int, default=2)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS + DP_SCENARIOS),
                        choices=SCENARIOS + DP_SCENARIOS)
    parser.add_argument("--dp-tp", type=int, default=1, choices=(1, 2),
                        help="tensor parallel size of the dp-save-* scenarios (DP=2 x TP on 2 x TP ranks)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose mindspeed_mm is measured")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mindspeed_mm_load_memory"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another --repo")
    parser.add_argument("--rank-scenario", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_scenario:
        run_rank(args.rank_scenario, args.workdir, args.out)
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    write_inputs(work, args.layers, args.heads, args.head_dim, args.train_heads, args.train_layers,
                 real_width=bool({"official", "megatron", "dpo", "save"} & set(args.scenarios)))
    label = "before" if args.repo.resolve() != REPO else "after"
    print(f"mindspeed_mm from {args.repo}; TP=2 on 2 gloo ranks; real width {args.heads}x{args.head_dim}, "
          f"{args.layers} layer(s), bf16; training checkpoint {args.train_heads}x{args.head_dim}, "
          f"{args.train_layers} layers")
    print(f"{'scenario':11s} {'share/rank':>10s} {'peak growth':>11s} {'x share':>8s} {'x state':>8s} {'time':>7s}")
    dp_header = True
    try:
        for scenario in args.scenarios:
            if scenario in DP_SCENARIOS:
                if dp_header:
                    print(f"distributed optimizer, TP={args.dp_tp} x DP=2, {args.train_heads}x{args.head_dim}, "
                          f"{args.train_layers} layers; state = bf16 weights + fp32 main weights and Adam moments "
                          f"of the rank's shard; DP group = the optimizer state of the whole DP group")
                    print(f"{'scenario':14s} {'rank':>4s} {'state':>11s} {'optimizer':>11s} {'DP group':>11s} "
                          f"{'peak growth':>11s} {'x state':>8s} {'x group':>8s} {'time':>7s}")
                    dp_header = False
                print_dp_save(scenario, run_scenario(scenario, work, args.repo, label, tp=args.dp_tp))
                continue
            if scenario in ("train-load", "resume") and not (work / f"train_{label}").is_dir():
                run_scenario("train-save", work, args.repo, label)
            r = run_scenario(scenario, work, args.repo, label)
            state = f"{r['growth'] / r['state']:7.2f}x" if r["state"] else f"{'':8s}"
            print(f"{scenario:11s} {r['weights'] / GiB:7.2f} GiB {r['growth'] / GiB:7.2f} GiB "
                  f"{r['growth'] / r['weights']:7.2f}x {state} {r['seconds']:6.1f}s", flush=True)
    finally:
        for name in (f"train_{label}", f"save_{label}"):
            shutil.rmtree(work / name, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
