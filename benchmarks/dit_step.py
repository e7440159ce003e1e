"""Time one StepVideo DiT step: forward only, and forward + backward.

    python benchmarks/dit_step.py --layers 2 --heads 48 --head-dim 128 --video 136 544 992 --dtype bf16
    python benchmarks/dit_step.py --layers 2 --heads 4 --head-dim 32 --frames 4 --height 8 --width 8 --dtype fp32

Sizes are latent sizes (--frames/--height/--width), or a pixel video (--video T H W), which
the Video-VAE maps to T/17*3 latent frames of H/16 x W/16 (136x544x992 -> 24x34x62, 50,592
tokens). Prints tokens/s, peak memory (CUDA/NPU allocator peak on accelerators, process peak
RSS on CPU) and, on CUDA, MFU: model matmul FLOPs (3x forward for a training step, recompute
not counted) over the card's dense bf16 peak (--peak-tflops; default by card name).
Runs in a single process (TP = CP = 1) with random weights.

--json PATH also writes the figures (seconds, tokens/s, TFLOP/s, MFU, peak and base memory in bytes) to a file;
`run(parse_args([...]))` returns them to a caller (benchmarks/device_check.py). --drop-grads frees each weight
gradient once it is complete, as Megatron's DDP does after adding it into its float32 buffer: the peak over the
memory held before the step is then the activations' alone, the figure the memory planner predicts.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.config.model import PredictorConfig  # noqa: E402
from mindspeed_mm.models.predictor import StepVideoDiT  # noqa: E402
from mindspeed_mm.checkpoint.stepvideo_adapter import default_channel_split  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def forward_flops(cfg: PredictorConfig, batch: int, tokens: int, text_len: int, llm_len: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
    d, s, kv = cfg.hidden_size, tokens, text_len
    per_block = (
        2 * s * d * 3 * d + 2 * s * d * d  # self-attention QKV and output projections
        + 4 * s * s * d  # QK^T and AV
        + 2 * s * d * d + 2 * kv * d * 2 * d + 2 * s * d * d  # cross-attention q, kv, out
        + 4 * s * kv * d  # cross-attention QK^T and AV
        + 2 * 2 * s * d * 4 * d  # FFN
    )
    c_in = cfg.in_channels * (2 if cfg.use_additional_conditions else 1)
    p2 = cfg.patch_size ** 2
    rest = (2 * s * c_in * d + 2 * s * d * cfg.out_channels * p2  # patch embedding, proj_out
            + 2 * llm_len * (cfg.caption_channels[0] * d + d * d) + 2 * (kv - llm_len) * cfg.caption_channels[1] * d
            + 2 * (256 * d + d * d + 6 * d * d))
    return batch * (cfg.num_layers * per_block + rest)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats()
    else:
        _reset_resident_high_water_mark()


def _reset_resident_high_water_mark():
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident set, so that the next reading is the
    peak of what runs after it (elsewhere the reading stays the process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _status_bytes(field: str):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_bytes(device):
    """(memory held now, peak since the last _reset_peak) in bytes: the allocator's on CUDA/NPU, the resident set's
    on CPU (None where /proc is missing)."""
    if device.type in ("cuda", "npu"):
        module = getattr(torch, device.type)
        module.synchronize()
        return module.memory_allocated(), module.max_memory_allocated()
    return _status_bytes("VmRSS"), _status_bytes("VmHWM")


def _peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA allocator peak)"
    if device.type == "npu":
        return f"{torch.npu.max_memory_allocated() / 2**30:.2f} GiB (NPU allocator peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"


def _time(fn, device, warmup: int, steps: int):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--frames", type=int, default=4, help="latent frames")
    p.add_argument("--height", type=int, default=8, help="latent height")
    p.add_argument("--width", type=int, default=8, help="latent width")
    p.add_argument("--video", type=int, nargs=3, metavar=("T", "H", "W"), help="pixel size instead of latent size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--llm-len", type=int, default=320, help="step_llm tokens (all valid)")
    p.add_argument("--clip-len", type=int, default=77)
    p.add_argument("--caption-channels", type=int, nargs=2, default=[6144, 1024])
    p.add_argument("--in-channels", type=int, default=64)
    p.add_argument("--i2v", action="store_true")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, npu")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "flash", "npu"])
    p.add_argument("--recompute", choices=["none", "block", "uniform"], default="none")
    p.add_argument("--recompute-layers", type=int, default=None,
                   help="--recompute-num-layers (default: 1 for block, all layers for uniform)")
    p.add_argument("--mode", choices=["both", "forward", "train"], default="both")
    p.add_argument("--offload", action="store_true",
                   help="forward only: the blocks layer-wise offloaded to host memory (dit_layerwise_offload)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one card (default by name)")
    p.add_argument("--drop-grads", action="store_true",
                   help="free each weight gradient once complete (as Megatron DDP): the peak is the activations'")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def run(args) -> dict:
    """Build the model, time the modes, print the figures (as the command line does) and return them."""
    if args.device == "auto":
        from mindspeed_mm.runtime import current_device

        device = current_device()
    else:
        device = torch.device(args.device)
    frames, height, width = args.frames, args.height, args.width
    if args.video:
        t, hp, wp = args.video
        frames, height, width = t // 17 * 3, hp // 16, wp // 16
    cfg = PredictorConfig(
        num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim,
        channel_split=default_channel_split(args.head_dim), in_channels=args.in_channels,
        out_channels=args.in_channels, caption_channels=list(args.caption_channels), dtype=args.dtype,
        use_additional_conditions=args.i2v, attention_backend=args.attention_backend,
    )
    torch.manual_seed(0)
    if args.offload and args.mode != "forward":
        raise SystemExit("--offload times the forward only (inference): add --mode forward.")
    model = StepVideoDiT.build(cfg, device="cpu" if args.offload else device)
    block_bytes = sum(p.numel() * p.element_size() for p in model.transformer_blocks[0].parameters())
    if args.offload:
        model.requires_grad_(False)
        model.offload_blocks(device)
    if args.recompute != "none":
        recompute_layers = args.recompute_layers or (1 if args.recompute == "block" else args.layers)
        model.configure_recompute("full", args.recompute, recompute_layers)
    if args.drop_grads:
        for param in model.parameters():
            param.register_post_accumulate_grad_hook(lambda done: setattr(done, "grad", None))
    b, dtype = args.batch, model.dtype
    latents = torch.randn(b, frames, cfg.in_channels, height, width, device=device, dtype=dtype)
    inputs = dict(
        latents=latents, timestep=torch.rand(b, device=device),
        prompt=[torch.randn(b, args.llm_len, cfg.caption_channels[0], device=device, dtype=dtype),
                torch.randn(b, args.clip_len, cfg.caption_channels[1], device=device, dtype=dtype)],
        prompt_mask=[torch.ones(b, args.llm_len, device=device), torch.ones(b, args.clip_len, device=device)],
    )
    if args.i2v:
        inputs["image_latents"] = torch.zeros_like(latents)
    tokens = frames * height * width
    params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device {device} ({device_name}), "
          f"dtype {args.dtype}, {args.layers} layers x {args.heads} heads x {args.head_dim}, {params / 1e9:.3f} B "
          f"params, latents {b}x{frames}x{height}x{width} = {b * tokens} tokens, text {args.clip_len + args.llm_len}, "
          f"recompute {args.recompute}" + (", blocks offloaded to host memory" if args.offload else ""))

    flops = forward_flops(cfg, b, tokens, args.clip_len + args.llm_len, args.llm_len)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)

    from mindspeed_mm.models.common.attention import resolve_backend

    result = {
        "device": str(device), "device_name": device_name, "torch": torch.__version__, "dtype": args.dtype,
        "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "batch": b, "frames": frames,
        "height": height, "width": width,
        "tokens": b * tokens, "text_tokens": args.clip_len + args.llm_len, "params": params,
        "recompute": args.recompute, "recompute_layers": model.recompute_num_layers or 0,
        "drop_grads": args.drop_grads,
        "attention_backend": resolve_backend(args.attention_backend, device), "forward_flops": flops,
        "offload": args.offload, "block_bytes": block_bytes,
        "peak_tflops": peak if device.type == "cuda" else None,
    }

    def measure(label, key, fn, step_flops):
        gc.collect()
        _reset_peak(device)
        base, _ = _memory_bytes(device)
        seconds = _time(fn, device, args.warmup, args.steps)
        _, peak_bytes = _memory_bytes(device)
        mfu = step_flops / seconds / (peak * 1e12) if device.type == "cuda" and peak else None
        line = f"{label}: {seconds * 1e3:.1f} ms, {b * tokens / seconds:,.0f} tokens/s, " \
               f"{step_flops / seconds / 1e12:.2f} TFLOP/s"
        if mfu is not None:
            line += f", MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s bf16 peak"
        print(line + f", peak memory {_peak_memory(device)}")
        result[key] = {"seconds": seconds, "tokens_per_s": b * tokens / seconds,
                       "tflops": step_flops / seconds / 1e12, "mfu": mfu, "flops": step_flops,
                       "base_bytes": base, "peak_bytes": peak_bytes,
                       "growth_bytes": None if base is None or peak_bytes is None else max(peak_bytes - base, 0),
                       "memory": "allocator" if device.type in ("cuda", "npu") else "resident set"}

    if args.mode in ("both", "forward"):
        model.eval()

        def forward():
            with torch.no_grad():
                model(**inputs)

        measure("forward", "forward", forward, flops)
    if args.mode in ("both", "train"):
        model.train()
        upstream = torch.randn_like(latents, dtype=dtype)

        def train_step():
            model.zero_grad(set_to_none=True)
            (model(**inputs).float() * upstream.float()).mean().backward()

        measure("forward+backward", "train", train_step, 3 * flops)
    return result


if __name__ == "__main__":
    main()
