"""Time and peak memory of checkpoint conversion on a synthetic official checkpoint of a few GB.

    python benchmarks/convert.py --layers 2 --tp 8 --workdir /tmp/convert_bench

Writes a random real-width StepVideo DiT (48 heads x 128 = 6144 wide, `--layers` blocks, bfloat16)
in the official sharded layout, then runs, each in a fresh process so its peak RSS (VmHWM) is its
own: split to TP=`--tp`, and merge back to TP=1. Prints seconds, peak RSS, and peak RSS as a
multiple of the checkpoint size.
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
sys.path.insert(0, str(REPO))

CHILD = """
import json, sys, time
from mindspeed_mm.checkpoint.convert import merge, split
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
mode, src, dst, tp, layers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
base = hwm()
start = time.perf_counter()
(split if mode == "split" else merge)(src, dst, tp, [layers], layers, log=lambda m: None)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": hwm(), "baseline_rss": base}))
"""


def write_synthetic(folder: Path, layers: int, heads: int, head_dim: int, shard_bytes: int) -> int:
    """A random official-layout DiT written shard by shard; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from mindspeed_mm.checkpoint.stepvideo_adapter import official_param_shapes
    from mindspeed_mm.tiny.dit import official_config

    config = official_config(num_layers=layers, num_heads=heads, head_dim=head_dim, in_channels=64,
                             caption_channels=(6144, 1024))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = sorted(official_param_shapes(config).items())
    generator = torch.Generator().manual_seed(0)
    groups, current, size = [], [], 0
    for key, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (0.02 * torch.randn(s, generator=generator)).to(torch.bfloat16) for k, s in group}
        save_file(tensors, str(folder / name))
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_child(mode: str, src: Path, dst: Path, tp: int, layers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst), str(tp), str(layers)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--shard-gb", type=float, default=1.0, help="size of each source safetensors file")
    parser.add_argument("--workdir", default="/tmp/mindspeed_mm_convert_bench")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    size = write_synthetic(work / "transformer", args.layers, args.heads, args.head_dim, int(args.shard_gb * 2**30))
    print(f"synthetic official checkpoint: {args.layers} layers, {args.heads}x{args.head_dim}, bfloat16, "
          f"{size / 2**30:.2f} GiB (written in {time.perf_counter() - start:.1f} s)")
    try:
        for mode, src, dst, tp in (("split", work / "transformer", work / f"tp{args.tp}", args.tp),
                                   ("merge", work / f"tp{args.tp}", work / "tp1", 1)):
            r = run_child(mode, src, dst, tp, args.layers)
            print(f"{mode:5s} -> TP={tp}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                  f"({r['peak_rss'] / size:.2f}x the checkpoint; {r['baseline_rss'] / 2**30:.2f} GiB before "
                  f"converting)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
