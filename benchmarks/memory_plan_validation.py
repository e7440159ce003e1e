"""Check the memory planner (mindspeed_mm/tools/memory_plan) against measured peaks.

    python benchmarks/memory_plan_validation.py                 # the default suite, on this machine
    python benchmarks/memory_plan_validation.py --quick         # two small cases
    python benchmarks/memory_plan_validation.py --out figures.json
    python benchmarks/memory_plan_validation.py --only "+SP"    # the cases whose description contains this text

Two kinds of case, each run in a fresh process (torchrun for two ranks: gloo on CPU; two GPUs on CUDA):

- "activations": a real-width DiT (hidden 6144, 48 heads x 128) with 1 or 2 blocks, bf16, forward + backward on
  latents of several token counts, at 1 rank, TP=2 and CP=2 (Ulysses), TP=2 with sequence parallel and CP=2 ring
  attention (megatron_cp_algo), the latter two also at 2,025 tokens (padded to a multiple of CP x TP), and with
  --hybrid CP=4 hybrid_cp_algo with Ulysses degree 2 (four ranks), with and without recompute. As in training, each
  weight gradient is dropped as soon as it is complete (Megatron DDP adds it into its float32 buffer and frees it;
  that buffer is the "training" case's business). Measured: the peak minus the memory before the step; predicted:
  the planner's activation peak.
- "training": the real training step, `DiffusionLossModel` + Megatron DDP (grad_reduce_in_fp32) + Megatron's optimizer,
  plain or distributed, at a narrower width (hidden 2048: the real width's float32 optimizer states do not fit in
  this machine's memory). Measured: memory after the step minus memory before the model was built (parameters,
  gradient buffer, master weights, Adam states), and the peak of the second step over the same baseline;
  predicted: the planner's persistent total and peak.

How the peak is measured. On CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. On CPU there
are no allocator statistics, so the process's resident set is used: the peak is the kernel's high-water mark
(VmHWM), reset before each measured step by writing 5 to /proc/self/clear_refs (Linux), minus the resident set
before the step. glibc's malloc keeps freed memory of small and medium blocks for reuse, which would make the
resident set lag the live tensors; the runner therefore starts every case with MALLOC_MMAP_THRESHOLD_=65536, so that
every tensor above 64 KiB is its own mapping, returned to the kernel when it is freed. A torch.profiler memory
profile would count allocations exactly but costs minutes per real-width step on two cores and still misses
oneDNN's scratch memory, which the resident set sees. CPU kernels differ from accelerator kernels in their temporary
buffers, so the CPU figures check the model's bookkeeping of what autograd keeps; the CUDA run checks it on the
kernels that matter.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REAL_HEADS, HEAD_DIM = 48, 128
NARROW_HEADS = 16  # hidden 2048 for the training-step cases
LLM_TOKENS, CLIP_TOKENS = 320, 77
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
TOLERANCE = 0.15


# --- measuring ------------------------------------------------------------------------------


class PeakMeter:
    """Peak memory of a region: CUDA allocator statistics, else the resident set's high-water mark (Linux)."""

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_bytes("VmRSS")

    def reset(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident set

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.M).group(1)) * 1024


# --- one case, in a worker process ----------------------------------------------------------


def _inputs(frames: int, height: int, width: int, in_channels: int, device, generator):
    import torch

    latents = torch.randn(1, frames, in_channels, height, width, generator=generator).to(device)
    prompt = [torch.randn(1, LLM_TOKENS, 6144, generator=generator).to(device, torch.bfloat16),
              torch.randn(1, CLIP_TOKENS, 1024, generator=generator).to(device, torch.bfloat16)]
    masks = [torch.ones(1, LLM_TOKENS, dtype=torch.long, device=device),
             torch.ones(1, CLIP_TOKENS, dtype=torch.long, device=device)]
    return latents, prompt, masks


def _predictor_config(layers: int, heads: int):
    from mindspeed_mm.config.model import PredictorConfig

    return PredictorConfig(num_layers=layers, num_heads=heads, head_dim=HEAD_DIM, dtype="bf16",
                           attention_backend="sdpa" if _device().type == "cpu" else "auto")


def _device():
    from mindspeed_mm.runtime import current_device

    return current_device()


def predict(case: dict, device_type: str) -> dict:
    """The planner's figures for a case: the activation peak ("activations"), or the persistent total and the
    peak of a whole step ("training")."""
    from mindspeed_mm.tools.memory_plan import DiTShape, Layout, Recompute, Training, Workload, plan_memory

    heads = NARROW_HEADS if case["kind"] == "training" else REAL_HEADS
    shape = DiTShape(num_layers=case["layers"], num_heads=heads, head_dim=HEAD_DIM)
    workload = Workload(batch=1, latent_frames=case["frames"], latent_height=case["height"],
                        latent_width=case["width"], llm_tokens=LLM_TOKENS, clip_tokens=CLIP_TOKENS)
    recompute = Recompute("block", case["layers"]) if case["recompute"] else Recompute()
    layout = Layout(case["tp"], case["cp"], case["world"] // (case["tp"] * case["cp"]), recompute,
                    case.get("distributed_optimizer", False), sequence_parallel=case.get("sp", False),
                    cp_algo=case.get("cp_algo", "ulysses_cp_algo"), ulysses_degree=case.get("ulysses_degree"))
    # On CPU, gloo and torch's per-tensor Adam have their own temporaries (see Training.backend).
    backend = "cpu" if device_type == "cpu" else "accelerator"
    plan = plan_memory(shape, workload, layout, Training(dtype_bytes=2, backend=backend))
    if case["kind"] == "training":
        return {"predicted_persistent": plan.persistent_total, "predicted": plan.peak}
    return {"predicted": plan.activations.peak}


def run_activation_case(case: dict) -> dict:
    """Forward + backward of a real-width DiT; weight gradients dropped as Megatron DDP would move them."""
    import torch

    from mindspeed_mm.models.predictor import StepVideoDiT

    device = _device()
    dit = StepVideoDiT.build(_predictor_config(case["layers"], REAL_HEADS)).train()
    if case["recompute"]:
        dit.configure_recompute("full", "block", case["layers"])
    for param in dit.parameters():
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    generator = torch.Generator().manual_seed(0)

    def step(frames, height, width):
        latents, prompt, masks = _inputs(frames, height, width, 64, device, generator)
        out = dit(latents, torch.tensor(0.5), prompt, masks)
        out.float().square().mean().backward()

    step(case["cp"], 2, 2)  # warm-up: kernels, thread pools and communication buffers are set up once
    meter = PeakMeter(device)
    meter.reset()
    before = meter.current()
    started = time.time()
    step(case["frames"], case["height"], case["width"])
    measured = meter.peak() - before
    return {"measured": measured, **predict(case, device.type), "seconds": round(time.time() - started, 1)}


def run_training_case(case: dict) -> dict:
    """Two training steps of DiffusionLossModel + Megatron DDP + optimizer at a narrower width."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mindspeed_mm.config.model import DiffusionConfig
    from mindspeed_mm.models.diffusion import FlowMatchScheduler
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.models.diffusion_loss import DiffusionLossModel
    from mindspeed_mm.training.optimizer import build_optimizer

    device = _device()
    generator = torch.Generator().manual_seed(0)
    latents, prompt, masks = _inputs(case["frames"], case["height"], case["width"], 64, device, generator)
    batch = {"video": latents.to(torch.bfloat16), "prompt": prompt, "prompt_mask": masks}
    meter = PeakMeter(device)
    meter.reset()
    before = meter.current()
    dit = StepVideoDiT.build(_predictor_config(case["layers"], NARROW_HEADS)).train()
    if case["recompute"]:
        dit.configure_recompute("full", "block", case["layers"])
    model = DiffusionLossModel(dit, FlowMatchScheduler.from_config(DiffusionConfig()))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=case["distributed_optimizer"]), model)
    args = Namespace(optimizer="adam", lr=1e-5, min_lr=1e-5, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                     adam_eps=1e-15, sgd_momentum=0.9, clip_grad=1.0, bf16=True, fp16=False,
                     use_distributed_optimizer=case["distributed_optimizer"], loss_scale=None,
                     initial_loss_scale=2.0**32, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2,
                     lr_warmup_iters=0, lr_warmup_fraction=None, lr_decay_iters=None, train_iters=10,
                     lr_warmup_init=1e-5, lr_decay_style="constant")
    optimizer, _ = build_optimizer(args, ddp)

    def step(seed: int):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(batch, torch.Generator().manual_seed(seed))
        loss.mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()

    step(1)  # the first step also creates the Adam states
    gc.collect()
    persistent = meter.current() - before
    meter.reset()
    started = time.time()
    step(2)
    peak = meter.peak() - before
    return {"measured_persistent": persistent, "measured": peak, **predict(case, device.type),
            "seconds": round(time.time() - started, 1)}


def worker(case: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.runtime import initialize_runtime

    torch.manual_seed(0)
    sequence = SequenceParallelOptions(case.get("cp_algo", "ulysses_cp_algo"), case.get("ulysses_degree"),
                                       case.get("sp", False))
    # the device's library: gloo on CPU, NCCL on CUDA
    initialize_runtime(case["tp"], case["cp"], 1, seed=1234, sequence=sequence)
    result = run_training_case(case) if case["kind"] == "training" else run_activation_case(case)
    result["rank"] = dist.get_rank()
    result["device"] = _device().type
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


# --- the suite, in the driver process -------------------------------------------------------


def _case(kind, world, tp, cp, layers, frames, height, width, recompute, distributed_optimizer=False,
          sp=False, cp_algo="ulysses_cp_algo", ulysses_degree=None) -> dict:
    case = {"kind": kind, "world": world, "tp": tp, "cp": cp, "layers": layers, "frames": frames, "height": height,
            "width": width, "recompute": recompute, "distributed_optimizer": distributed_optimizer}
    if sp or cp_algo != "ulysses_cp_algo":  # the sequence options, only where they differ from the defaults
        case.update(sp=sp, cp_algo=cp_algo, ulysses_degree=ulysses_degree)
    return case


def default_suite(quick: bool, hybrid: bool = False) -> List[dict]:
    """Token counts 512 to 4096 (frames x 16 x 32 latents), kept within this machine's memory."""
    if quick:
        return [_case("activations", 1, 1, 1, 1, 1, 16, 32, False),
                _case("training", 1, 1, 1, 2, 1, 16, 32, False)]
    cases = []
    for frames in (1, 2, 4, 8):
        for recompute in (False, True):
            cases.append(_case("activations", 1, 1, 1, 1, frames, 16, 32, recompute))
    for recompute in (False, True):
        cases.append(_case("activations", 1, 1, 1, 2, 4, 16, 32, recompute))
    for tp, cp in ((2, 1), (1, 2)):
        for frames in (2, 8):
            for recompute in (False, True):
                cases.append(_case("activations", 2, tp, cp, 1, frames, 16, 32, recompute))
    # Sequence parallel (TP 2) and ring attention (CP 2): 2,048 and 4,096 tokens, and 2,025 (5 x 15 x 27: odd, so
    # the tokens are padded to a multiple of CP x TP); hybrid CP 4 (Ulysses 2 x ring 2) needs four ranks (--hybrid).
    for frames, height, width in ((4, 16, 32), (8, 16, 32), (5, 15, 27)):
        for recompute in (False, True):
            cases.append(_case("activations", 2, 2, 1, 1, frames, height, width, recompute, sp=True))
            cases.append(_case("activations", 2, 1, 2, 1, frames, height, width, recompute,
                               cp_algo="megatron_cp_algo"))
    if hybrid:
        for recompute in (False, True):
            cases.append(_case("activations", 4, 1, 4, 1, 5, 15, 27, recompute, cp_algo="hybrid_cp_algo",
                               ulysses_degree=2))
    cases += [_case("training", 1, 1, 1, 2, 2, 16, 32, False),
              _case("training", 2, 1, 1, 2, 2, 16, 32, False, distributed_optimizer=True),
              _case("training", 2, 2, 1, 2, 2, 16, 32, True),
              _case("training", 2, 1, 2, 2, 2, 16, 32, False, distributed_optimizer=True)]
    return cases


def run_case(case: dict, threads: int) -> List[dict]:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as out_dir:
        args = [__file__, "--worker", json.dumps(case), "--worker-out", out_dir]
        if case["world"] == 1:
            command = [sys.executable] + args
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={case['world']}"] + args
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(case["world"])]


def measure(case: dict, threads: int) -> List[dict]:
    """One case's rows (a training case gives two: persistent and peak), from the rank that needs the most."""
    results = run_case(case, threads)
    rows = []
    for label, m_key, p_key in (("persistent", "measured_persistent", "predicted_persistent"),
                                ("peak", "measured", "predicted")):
        if m_key not in results[0]:
            continue
        rank = max(results, key=lambda r: r[m_key])
        rows.append({"case": describe(case) + (f" [{label}]" if case["kind"] == "training" else ""),
                     "case_spec": case, "device": rank["device"], "measured": rank[m_key], "predicted": rank[p_key],
                     "predicted_key": p_key, "seconds": rank["seconds"]})
        print(f"{rows[-1]['case']}: measured {_gib(rows[-1]['measured'])} GiB ({rank['seconds']} s)", flush=True)
    return rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def describe(case: dict) -> str:
    tokens = case["frames"] * case["height"] * case["width"]
    what = f"{case['layers']} layer{'s' if case['layers'] > 1 else ''}, {tokens} tokens"
    layout = f"TP {case['tp']} CP {case['cp']} DP {case['world'] // (case['tp'] * case['cp'])}"
    algo = case.get("cp_algo", "ulysses_cp_algo")
    if algo == "megatron_cp_algo":
        layout += " ring"
    elif algo == "hybrid_cp_algo":
        layout += f" hybrid u{case['ulysses_degree']}"
    if case.get("sp") and case["tp"] > 1:
        layout += " +SP"
    extra = ", recompute" if case["recompute"] else ""
    if case["kind"] == "training":
        extra += ", distributed optimizer" if case["distributed_optimizer"] else ", plain optimizer"
    return f"{case['kind']}: {what}, {layout}{extra}"


def table(rows: List[dict]) -> str:
    lines = ["| case | measured GiB | predicted GiB | error |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {_gib(row['measured'])} | {_gib(row['predicted'])} | "
                     f"{row['error'] * 100:+.1f}% |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small cases")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--only", default=None, help="run the cases whose description contains this text")
    parser.add_argument("--hybrid", action="store_true", help="add the hybrid CP 4 (u2) cases: four ranks")
    parser.add_argument("--repredict", default=None,
                        help="a JSON file of an earlier --out: compare its measurements with the planner as it is now")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.worker_out)
        return 0
    if args.repredict:
        # The measurements of an earlier run against the planner as it is now (the measured code is unchanged).
        rows = json.loads(Path(args.repredict).read_text())
        for row in rows:
            key = row.get("predicted_key") or ("predicted_persistent" if row["case"].endswith("[persistent]")
                                               else "predicted")
            row["predicted"] = predict(row["case_spec"], row.get("device", "cpu"))[key]
    else:
        rows = []
        for case in default_suite(args.quick, args.hybrid):
            if args.only and args.only not in describe(case):
                continue
            rows += measure(case, args.threads)
    worst = 0.0
    for row in rows:
        row["error"] = (row["predicted"] - row["measured"]) / row["measured"]
        worst = max(worst, abs(row["error"]))
        print(f"{row['case']}: measured {_gib(row['measured'])} GiB, predicted {_gib(row['predicted'])} GiB, "
              f"error {row['error'] * 100:+.1f}% ({row['seconds']} s)", flush=True)
    print()
    print(table(rows))
    print(f"\nlargest error {worst * 100:.1f}% (tolerance {TOLERANCE * 100:.0f}%)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
