"""Activation memory per rank of the real-width DiT at TP=2, with and without Megatron sequence parallel.

    python benchmarks/activation_memory_sp.py              # 1 block, 1024 and 2048 tokens (about 7 minutes)
    python benchmarks/activation_memory_sp.py --large      # also 4096 tokens (about 15 minutes on 2 cores)
    python benchmarks/activation_memory_sp.py --dry        # tiny model, seconds
    python benchmarks/activation_memory_sp.py --out figures.json

Two gloo ranks (torchrun, one launch per sequence-parallel setting, since the model reads the setting when it is
built), a DiT of hidden 6144 (48 heads x 128) with 1 block in bf16, forward + backward on latents of frames x 16 x
32 tokens, without and with full block recompute. For each case and rank:

- saved: the bytes autograd keeps for backward (`saved_tensors_hooks`, a storage counted once, parameters excluded),
  in the blocks and in all (with full recompute the blocks save nothing themselves; Megatron's checkpoint keeps
  each recomputed block's input, which shows in "all");
- peak: the resident-set high-water mark of the forward + backward minus the resident set before it, i.e. above the
  weights; weight gradients are dropped as soon as they are complete (as Megatron DDP moves them into its buffer),
  so what is left is the activations, their gradients and kernels' temporaries. Measured as in
  `benchmarks/memory_plan_validation.py` (VmHWM reset through /proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536);
- the planner's activation peak for the same layout (`mindspeed_mm.tools.memory_plan`), for comparison.

The table shows the rank with the larger peak, and the ratio SP / no SP of the saved bytes and of the peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
TP = 2


def settings(dry: bool, large: bool = False) -> dict:
    if dry:
        return {"layers": 1, "heads": 4, "head_dim": 128, "caption": [64, 32], "llm": 20, "clip": 7,
                "shapes": [[1, 4, 8], [2, 4, 8]]}
    return {"layers": 1, "heads": 48, "head_dim": 128, "caption": [6144, 1024], "llm": 320, "clip": 77,
            "shapes": [[2, 16, 32], [4, 16, 32]] + ([[8, 16, 32]] if large else [])}


def _config(cfg: dict):
    from mindspeed_mm.config.model import PredictorConfig

    return PredictorConfig(num_layers=cfg["layers"], num_heads=cfg["heads"], head_dim=cfg["head_dim"],
                           caption_channels=list(cfg["caption"]), dtype="bf16", attention_backend="sdpa")


def predict(cfg: dict, shape: List[int], sp: bool, recompute: bool) -> int:
    from mindspeed_mm.tools.memory_plan import DiTShape, Layout, Recompute, Training, Workload, plan_memory

    dit_shape = DiTShape.from_config(_config(cfg))
    workload = Workload(1, *shape, llm_tokens=cfg["llm"], clip_tokens=cfg["clip"])
    rc = Recompute("block", cfg["layers"]) if recompute else Recompute()
    layout = Layout(TP, 1, 1, rc, sequence_parallel=sp)
    return plan_memory(dit_shape, workload, layout, Training(dtype_bytes=2, backend="cpu")).activations.peak


def worker(spec: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from memory_plan_validation import PeakMeter
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.runtime import current_device, initialize_runtime

    cfg, sp = spec["cfg"], spec["sp"]
    torch.manual_seed(0)
    initialize_runtime(TP, 1, 1, seed=1234, sequence=SequenceParallelOptions("ulysses_cp_algo", None, sp))
    rank = dist.get_rank()
    device = current_device()
    dit = StepVideoDiT.build(_config(cfg)).train()
    assert dit.parallel.sequence_parallel == sp
    params = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    for param in dit.parameters():
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    where = ["outside"]
    for i, block in enumerate(dit.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        block.register_forward_hook(lambda *_: where.__setitem__(0, "outside"))

    def step(frames, height, width, seen=None):
        g = torch.Generator().manual_seed(0)  # the same inputs on both ranks
        latents = torch.randn(1, frames, 64, height, width, generator=g).to(device)
        prompt = [torch.randn(1, cfg["llm"], cfg["caption"][0], generator=g).to(device, torch.bfloat16),
                  torch.randn(1, cfg["clip"], cfg["caption"][1], generator=g).to(device, torch.bfloat16)]
        masks = [torch.ones(1, cfg["llm"], dtype=torch.long, device=device),
                 torch.ones(1, cfg["clip"], dtype=torch.long, device=device)]

        def pack(tensor):
            storage = tensor.untyped_storage()
            if seen is not None and storage.data_ptr() not in params:
                seen.setdefault(storage.data_ptr(), (storage.nbytes(), where[0]))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = dit(latents, torch.tensor(0.5), prompt, masks)
        out.float().square().mean().backward()

    step(1, 2, 2)  # warm-up: kernels, thread pools, communication buffers
    meter = PeakMeter(device)
    rows = []
    for recompute in (False, True):
        dit.configure_recompute(*(("full", "block", cfg["layers"]) if recompute else (None,)))
        for shape in cfg["shapes"]:
            seen = {}
            meter.reset()
            before = meter.current()
            started = time.time()
            step(*shape, seen=seen)
            peak = meter.peak() - before
            saved_blocks = sum(n for n, w in seen.values() if w != "outside")
            saved_all = sum(n for n, _ in seen.values())
            seen.clear()
            gc.collect()
            rows.append({"rank": rank, "sp": sp, "recompute": recompute, "shape": shape,
                         "tokens": shape[0] * shape[1] * shape[2], "saved_blocks": saved_blocks,
                         "saved_all": saved_all, "peak": peak, "predicted": predict(cfg, shape, sp, recompute),
                         "seconds": round(time.time() - started, 1)})
            if rank == 0:
                print(f"[rank 0] sp={sp} recompute={recompute} tokens={rows[-1]['tokens']}: peak "
                      f"{_gib(peak)} GiB, saved in blocks {_gib(saved_blocks)} GiB ({rows[-1]['seconds']} s)",
                      flush=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    dist.barrier()
    dist.destroy_process_group()


def run(sp: bool, cfg: dict, threads: int) -> List[dict]:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TP}", __file__,
                   "--worker", json.dumps({"cfg": cfg, "sp": sp}), "--worker-out", out_dir]
        done = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)  # rank 0's progress on stdout
        if done.returncode != 0:
            raise RuntimeError(f"sp={sp} failed:\n{done.stderr[-4000:]}")
        return [row for r in range(TP) for row in json.loads(Path(out_dir, f"rank{r}.json").read_text())]


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def table(rows: List[dict]) -> str:
    """One line per (tokens, recompute): the rank with the larger peak, no SP and SP side by side."""
    def worst(sp, recompute, tokens):
        return max((r for r in rows if (r["sp"], r["recompute"], r["tokens"]) == (sp, recompute, tokens)),
                   key=lambda r: r["peak"])

    lines = ["| tokens | recompute | saved in blocks GiB no SP / SP | saved in all GiB no SP / SP | ratio saved (all) "
             "| peak GiB no SP / SP | ratio peak | planner peak GiB no SP / SP |",
             "|---|---|---|---|---|---|---|---|"]
    for recompute in (False, True):
        for tokens in sorted({r["tokens"] for r in rows}):
            a, b = worst(False, recompute, tokens), worst(True, recompute, tokens)
            lines.append(f"| {tokens} | {'full' if recompute else 'none'} | {_gib(a['saved_blocks'])} / "
                         f"{_gib(b['saved_blocks'])} | {_gib(a['saved_all'])} / {_gib(b['saved_all'])} | "
                         f"{b['saved_all'] / a['saved_all']:.2f} | {_gib(a['peak'])} / {_gib(b['peak'])} | "
                         f"{b['peak'] / a['peak']:.2f} | {_gib(a['predicted'])} / {_gib(b['predicted'])} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="a tiny model (hidden 512) at 32 and 64 tokens: seconds")
    parser.add_argument("--large", action="store_true", help="also 4096 tokens (about 100 s a step per setting)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.worker_out)
        return 0
    cfg = settings(args.dry, args.large)
    rows = []
    for sp in (False, True):
        started = time.time()
        print(f"TP={TP}, sequence parallel {'on' if sp else 'off'}: launching 2 ranks ...", flush=True)
        rows += run(sp, cfg, args.threads)
        print(f"TP={TP}, sequence parallel {'on' if sp else 'off'}: done in {time.time() - started:.0f} s", flush=True)
    print()
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
