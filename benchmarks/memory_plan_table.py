"""The memory planner's table for the released StepVideo DiT (48 layers, hidden 6144), as in docs/performance.md.

    python benchmarks/memory_plan_table.py
    python benchmarks/memory_plan_table.py --worlds 8 16 32 64 --devices 64 80 141 --margin 0.1

For each task (t2v, i2v) and video (544 x 992 with 136 and 204 frames), world size and device memory: the cheapest
layout that fits (fewest recomputed blocks, then smallest TP, then smallest CP, then the plain optimizer), training
on extracted features in bf16 with micro-batch 1, as the pretrain launchers do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.tools.memory_plan import GIB, DiTShape, Training, VAEShape, Workload, fitting_layouts  # noqa: E402
from mindspeed_mm.tools.memory_plan.plan import smallest_peak  # noqa: E402


def cell(shape: DiTShape, workload: Workload, world: int, device_gib: float, margin: float) -> str:
    fits = fitting_layouts(shape, workload, world, device_gib * (1 - margin) * GIB, Training())
    if not fits:
        closest = smallest_peak(shape, workload, world, Training())
        return f"none (lowest {closest.peak / GIB:.0f})" if closest is not None else "none"
    best = fits[0]
    lay = best.layout
    optimizer = ", DO" if lay.distributed_optimizer else ""
    recomputed = lay.recompute.recomputed_layers(shape.num_layers)
    return f"TP{lay.tp} CP{lay.cp}, rc {recomputed}{optimizer}: {best.plan.peak / GIB:.0f} ({len(fits)})"


def table(worlds: List[int], devices: List[float], margin: float) -> str:
    vae = VAEShape()
    lines = ["| task | frames (tokens) | ranks | " + " | ".join(f"{d:g} GB" for d in devices) + " |",
             "|---|---|---|" + "---|" * len(devices)]
    for task in ("t2v", "i2v"):
        shape = DiTShape(i2v=task == "i2v")
        for frames in (136, 204):
            h, w = vae.latent_size(544, 992)
            workload = Workload(1, vae.latent_frames(frames), h, w)
            tokens = workload.tokens(shape.patch_size)
            for world in worlds:
                cells = [cell(shape, workload, world, d, margin) for d in devices]
                lines.append(f"| {task} | {frames} ({tokens:,}) | {world} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--devices", type=float, nargs="+", default=[64, 80, 141], help="device memory, GB (2^30)")
    parser.add_argument("--margin", type=float, default=0.10, help="fraction of device memory kept free")
    args = parser.parse_args(argv)
    print(table(args.worlds, args.devices, args.margin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
