"""Where the DiT forward spends its CPU time: matmuls and attention against everything else (the elementwise chains).

    python benchmarks/dit_elementwise.py                        # 2 layers, 8 heads x 128, 4x16x32 tokens, fp32
    python benchmarks/dit_elementwise.py --dtype bf16 --heads 12 --compare-plain

Profiles forwards of a plain (one-process) DiT with random weights under torch.profiler and sums the self CPU time
of each operator into two groups: "matmul" (mm/addmm/bmm/linear kernels, convolution and the attention kernels) and
"other" (norms, RoPE, modulation, gates, activations, copies and casts). Prints both, their ratio and the forward
time. `--compare-plain` also runs the same weights with the fused elementwise path switched off
(`StepVideoDiT.fused_elementwise = False`: the official op-by-op chains) and prints both ratios and the speed-up of
the forward, with the max difference of the outputs. `--compare-compile` also runs the blocks compiled
(`--use-torch-compile`). Ratios, not absolute times, are what to read on a shared machine. The elementwise share
grows as the width shrinks (matmuls grow with width squared); the real width is hidden 6144 (48 heads x 128).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.config.model import PredictorConfig  # noqa: E402
from mindspeed_mm.models.predictor import StepVideoDiT  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_convolution", "aten::mkldnn_convolution",
              "aten::convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
              "aten::_flash_attention_forward", "aten::_efficient_attention_forward")


def build(args, dtype: str) -> StepVideoDiT:
    cfg = PredictorConfig(num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim,
                          channel_split=[args.head_dim // 2, args.head_dim // 4, args.head_dim // 4],
                          in_channels=16, out_channels=16, caption_channels=[256, 128], dtype=dtype)
    torch.manual_seed(0)
    return StepVideoDiT.build(cfg, device="cpu").eval()


def inputs(args, dit: StepVideoDiT):
    gen = torch.Generator().manual_seed(1)
    f, h, w = args.tokens
    latents = torch.randn(args.batch, f, 16, h, w, generator=gen)
    prompt = [torch.randn(args.batch, args.text_len, 256, generator=gen),
              torch.randn(args.batch, 77, 128, generator=gen)]
    masks = [torch.ones(args.batch, args.text_len, dtype=torch.long), torch.ones(args.batch, 77, dtype=torch.long)]
    return latents, torch.full((args.batch,), 0.5), prompt, masks


def profile(dit: StepVideoDiT, batch, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        dit(*batch)  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = dit(*batch)
            times.append(time.perf_counter() - start)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                dit(*batch)
    matmul = other = 0.0
    for event in prof.key_averages():
        if event.key in MATMUL_OPS:
            matmul += event.self_cpu_time_total
        else:
            other += event.self_cpu_time_total
    return {"matmul_ms": matmul / 1e3 / steps, "other_ms": other / 1e3 / steps, "ratio": other / matmul,
            "forward_s": statistics.median(times), "out": out.float()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs=3, default=[4, 16, 32], metavar=("F", "H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare-plain", action="store_true", help="also run the op-by-op (official) elementwise path")
    p.add_argument("--compare-compile", action="store_true",
                   help="also run the blocks compiled (--use-torch-compile), after a warm-up that compiles them")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dit = build(args, args.dtype)
    batch = inputs(args, dit)
    tokens = args.tokens[0] * args.tokens[1] * args.tokens[2]
    print(f"DiT {args.layers} layers, hidden {args.heads * args.head_dim}, {tokens} tokens x batch {args.batch}, "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    runs = {"fused": profile(dit, batch, args.steps)}
    if args.compare_plain:
        dit.fused_elementwise = False
        runs["plain"] = profile(dit, batch, args.steps)
        dit.fused_elementwise = True
    if args.compare_compile:
        start = time.perf_counter()
        dit.compile_blocks()
        with torch.no_grad():
            dit(*batch)
        compile_s = time.perf_counter() - start
        runs["compiled"] = profile(dit, batch, args.steps)
    for name, r in runs.items():
        print(f"{name:6s} forward {r['forward_s'] * 1e3:8.1f} ms | matmul+attention {r['matmul_ms']:8.1f} ms | "
              f"other {r['other_ms']:7.1f} ms | other / matmul {r['ratio']:.3f}")
    if args.compare_plain:
        f, pl = runs["fused"], runs["plain"]
        diff = (f["out"] - pl["out"]).abs().max().item()
        print(f"fused / plain: other-time ratio {f['other_ms'] / pl['other_ms']:.2f}, forward speed-up "
              f"{pl['forward_s'] / f['forward_s']:.3f}x, max |output difference| {diff:.2e}")
    if args.compare_compile:
        f, c = runs["fused"], runs["compiled"]
        print(f"compiled / eager (fused): forward speed-up {f['forward_s'] / c['forward_s']:.3f}x after "
              f"{compile_s:.0f} s of compilation, max |output difference| "
              f"{(c['out'] - f['out']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
