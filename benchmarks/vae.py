"""Benchmark the StepVideo Video-VAE: encode/decode frames/s and peak memory, untiled and tiled.

    python benchmarks/vae.py [--device cpu|cuda|npu] [--dtype fp32|bf16] [--sizes 17x32x32,17x64x64]
                             [--tile 32 --overlap 16] [--threads N] [--json out.json] [--widths real|test]

The model is the real-width version-2 VAE (official widths, ~499M parameters) with random
weights (seeded, variance-preserving kernels), fed a smooth moving colour pattern. `--widths test` builds the
golden case's reduced widths instead (3.3M parameters): a smoke run of this script in seconds, whose figures
say nothing about the real VAE. Sizes are
TxHxW of the input video; every size is encoded (posterior mean) and its latents decoded,
once untiled and once with spatial tiling (`--tile` / `--overlap` pixels).

Peak memory is the growth over the memory held before the call (weights, inputs):
- CUDA/NPU: the allocator's peak (`max_memory_allocated`) minus the allocation before the call.
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each
  call) minus the resident set before it. `tracemalloc` is not used: it sees Python's allocator
  only, not tensor storage.

The model computes large tensors in time chunks / frame blocks above fixed element counts; the
benchmark scales those thresholds with the frame area (unless --no-scaled-chunking), so that each
reduced size is cut exactly as the 544x992 target would be and its memory scales linearly to it.
From the two largest 17-frame sizes the script fits peak = a + b*H*W per mode and prints the extrapolated
peak for one 17-frame 544x992 chunk: untiled, tiled with the benchmark's window, and tiled with
the default 256-px window overlapping by 64 px (estimated as the untiled fit at 256x256, the cost
of one window, plus the tiled fit's per-pixel growth, the output canvas). It also prints the
tiled-vs-untiled error, mean |tiled - untiled| / std(untiled), for each size.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.models.ae import StepVideoVAE, blocks  # noqa: E402
from mindspeed_mm.tiny.vae import init_random_weights, smooth_video  # noqa: E402

TARGET = (17, 544, 992)
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 64
LARGE_CONV_ELEMENTS = blocks.LARGE_CONV_ELEMENTS
FRAME_BLOCK_ELEMENTS = blocks._FRAME_BLOCK_ELEMENTS
# The reduced widths of the golden case vae_v2 (tests/golden/stepvideo/README.md): every code path of the real
# VAE, with a 150th of its weights to draw.
TEST_WIDTHS = dict(z_channels=4, encoder_ch=32, encoder_ch_mult=(2, 1, 1, 1), decoder_ch=32,
                   decoder_ch_mult=(2, 1, 1, 1), num_res_blocks=2)



def _return_freed_memory_to_the_os():
    """With --tight-malloc: glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold resident;
    a fixed 64 KiB threshold maps and unmaps every tensor-sized block, so the resident set follows live memory.
    That is a lower bound of what the model needs, not what a user sees: the default measures glibc as shipped."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Meter:
    def __init__(self, device: torch.device):
        self.device = device
        self.accel = device.type in ("cuda", "npu")
        self.module = getattr(torch, device.type) if self.accel else None

    def run(self, fn):
        gc.collect()
        if self.accel:
            self.module.synchronize()
            self.module.reset_peak_memory_stats()
            base = self.module.memory_allocated()
        else:
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            base = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current resident set
        start = time.perf_counter()
        out = fn()
        if self.accel:
            self.module.synchronize()
        seconds = time.perf_counter() - start
        peak = (self.module.max_memory_allocated() if self.accel else _status_kib("VmHWM") * 1024) - base
        return out, seconds, max(peak, 0)


def fit_line(points):
    """a + b*x through the two largest-x points (smaller sizes are dominated by size-independent
    transients, e.g. oneDNN's reordered copy of the 226M-parameter conv_unpatchify kernel on CPU);
    a single point gives a line through the origin."""
    points = sorted(points)[-2:]
    if len(points) == 1:
        x, y = points[0]
        return 0.0, y / x
    (x0, y0), (x1, y1) = points
    b = (y1 - y0) / (x1 - x0)
    return y0 - b * x0, b


def gib(v: float) -> str:
    return f"{v / 2 ** 30:.3f} GiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or npu (default: the runtime's device)")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32 on CPU, bf16 otherwise)")
    parser.add_argument("--sizes", default="17x32x32,17x48x48,17x64x64", help="comma-separated TxHxW")
    parser.add_argument("--tile", type=int, default=32, help="tile size in pixels (multiple of 16)")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in pixels (multiple of 16)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--modes", default="untiled,tiled", help="untiled, tiled or both (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scaled-chunking", action="store_true",
                        help="keep the model's large-tensor thresholds instead of scaling them to the frame area")
    parser.add_argument("--tight-malloc", action="store_true",
                        help="set glibc's mmap threshold to 64 KiB (peak follows live memory; not a user's default)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--widths", choices=["real", "test"], default="real",
                        help="real: the released widths (default); test: the golden case's (a smoke run)")
    parser.add_argument("--merge", action="append", default=[],
                        help="a --json file of an earlier run (same device and dtype) whose sizes join the fit")
    args = parser.parse_args(argv)
    global _LIBC
    if args.tight_malloc:
        _LIBC = _return_freed_memory_to_the_os()

    from mindspeed_mm.config.model import torch_dtype
    from mindspeed_mm.runtime import current_device

    device = torch.device(args.device) if args.device else current_device()
    if device.type == "npu":
        import torch_npu  # noqa: F401
    dtype = torch_dtype(args.dtype or ("fp32" if device.type == "cpu" else "bf16"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    modes = [m for m in ("untiled", "tiled") if m in args.modes.split(",")]

    vae = StepVideoVAE(device="meta", dtype=dtype, **(TEST_WIDTHS if args.widths == "test" else {}))
    vae.to_empty(device="cpu")
    init_random_weights(vae, seed=args.seed, std_range=(0.0, math.inf))
    vae.to(device)
    params = sum(p.numel() for p in vae.parameters())
    print(f"StepVideo VAE v2, {args.widths} widths ({params / 1e6:.1f}M parameters, random weights), {dtype}, "
          f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"tiling: {args.tile}-px windows overlapping by {args.overlap} px")
    meter = Meter(device)
    with torch.no_grad():  # warm-up (kernel selection, allocator)
        vae.decode(vae.encode(smooth_video(1, 16, 16).to(device), sample=False), group=None)

    rows = []
    header = (f"{'size':>12} {'mode':>7} | {'enc fps':>8} {'enc peak':>11} | {'dec fps':>8} {'dec peak':>11} "
              f"| tiled err enc/dec")
    print(header)
    print("-" * len(header))
    for frames, height, width in sizes:
        if not args.no_scaled_chunking:
            # Scale the large-tensor thresholds with the frame area, so that a small benchmark size is
            # cut into the same time chunks / frame blocks as the 544x992 target: its peak then scales
            # linearly to the target's.
            ratio = height * width / (TARGET[1] * TARGET[2])
            blocks.LARGE_CONV_ELEMENTS = max(1, int(LARGE_CONV_ELEMENTS * ratio))
            blocks._FRAME_BLOCK_ELEMENTS = max(1, int(FRAME_BLOCK_ELEMENTS * ratio))
        video = smooth_video(frames, height, width).to(device)
        results = {}
        for mode in modes:
            vae.set_tiling(mode == "tiled", args.tile, args.overlap)
            z, enc_s, enc_peak = meter.run(partial(vae.encode, video, sample=False))
            latents = results["untiled"]["z"] if "untiled" in results else z
            out, dec_s, dec_peak = meter.run(partial(vae.decode, latents, group=None))
            results[mode] = {"z": z, "out": out}
            row = {"frames": frames, "height": height, "width": width, "mode": mode,
                   "encode_fps": frames / enc_s, "encode_peak_bytes": enc_peak,
                   "decode_fps": frames / dec_s, "decode_peak_bytes": dec_peak}
            err = ""
            if mode == "tiled" and "untiled" in results:
                ref_z, ref_out = results["untiled"]["z"], results["untiled"]["out"]
                row["encode_rel_err"] = ((z - ref_z).abs().mean() / ref_z.std()).item()
                row["decode_rel_err"] = ((out - ref_out).abs().mean() / ref_out.std()).item()
                err = f"{row['encode_rel_err']:.3f} / {row['decode_rel_err']:.3f}"
            rows.append(row)
            print(f"{frames:>3}x{height:>4}x{width:<4} {mode:>7} | {row['encode_fps']:>8.2f} "
                  f"{gib(enc_peak):>11} | {row['decode_fps']:>8.2f} {gib(dec_peak):>11} | {err}")
        del results, video
    vae.disable_tiling()
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        if earlier["device"] != str(device) or earlier["dtype"] != str(dtype):
            raise SystemExit(f"--merge {path}: measured on {earlier['device']} / {earlier['dtype']}, "
                             f"not {device} / {dtype}")
        known = {(r["frames"], r["height"], r["width"], r["mode"]) for r in rows}
        rows += [r for r in earlier["rows"] if (r["frames"], r["height"], r["width"], r["mode"]) not in known]
    blocks.LARGE_CONV_ELEMENTS, blocks._FRAME_BLOCK_ELEMENTS = LARGE_CONV_ELEMENTS, FRAME_BLOCK_ELEMENTS

    target_px = TARGET[1] * TARGET[2]
    print(f"\nExtrapolated peak memory for one {TARGET[0]}-frame {TARGET[1]}x{TARGET[2]} chunk "
          f"({dtype}; peak = a + b*H*W through the two largest {TARGET[0]}-frame sizes):")
    summary = {}
    for stage in ("encode", "decode"):
        fits = {}
        for mode in ("untiled", "tiled"):
            points = [(r["height"] * r["width"], r[f"{stage}_peak_bytes"]) for r in rows
                      if r["mode"] == mode and r["frames"] == TARGET[0]]
            if points:
                fits[mode] = fit_line(points)
        if "untiled" not in fits:
            print(f"  {stage}: no {TARGET[0]}-frame sizes measured")
            continue
        a_u, b_u = fits["untiled"]
        untiled = a_u + b_u * target_px
        line = f"  {stage}: untiled {gib(untiled)}"
        summary[stage] = {"untiled_bytes": untiled}
        if "tiled" in fits:
            a_t, b_t = fits["tiled"]
            tiled_bench = a_t + b_t * target_px
            tiled_default = a_u + b_u * DEFAULT_TILE ** 2 + b_t * target_px
            line += (f"; tiled {args.tile}/{args.overlap} px {gib(tiled_bench)}; "
                     f"tiled {DEFAULT_TILE}/{DEFAULT_OVERLAP} px (estimate) {gib(tiled_default)} "
                     f"({untiled / tiled_default:.1f}x less than untiled)")
            summary[stage].update(tiled_bench_bytes=tiled_bench, tiled_default_bytes=tiled_default)
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "dtype": str(dtype), "rows": rows,
                                               "extrapolation": summary, "tile": args.tile,
                                               "overlap": args.overlap, "widths": args.widths,
                                               "parameters": params}, indent=2))


if __name__ == "__main__":
    main()
