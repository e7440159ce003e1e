"""The memory planner's tables for the released StepVideo DiT (48 layers, hidden 6144), as in docs/performance.md.

    python benchmarks/memory_plan_table.py
    python benchmarks/memory_plan_table.py --worlds 8 16 32 64 --devices 64 80 96 141 --margin 0.1 --node-size 8

Training on extracted features in bf16 with micro-batch 1, as the pretrain launchers do; TP a divisor of
`--node-size` (8: tensor parallel within a node of eight devices). Two tables:

- for each task (t2v, i2v) and video (544 x 992 with 136 and 204 frames), world size and device memory: the cheapest
  layout that fits, searched over TP, CP, sequence parallel, the context-parallel algorithm (Ulysses, ring, hybrid)
  and the optimizer (cheapest: fewest recomputed blocks, then smallest TP, then smallest CP, then Ulysses before
  hybrid before ring, then sequence parallel off, then the plain optimizer);
- at 544 x 992 x 204 (t2v, 75,888 tokens), per world size, the cheapest layout of each family: Ulysses without
  sequence parallel (all the planner searched before), with sequence parallel, and ring or hybrid attention.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.tools.memory_plan import GIB, DiTShape, Layout, Recompute, Training, VAEShape, Workload  # noqa: E402
from mindspeed_mm.tools.memory_plan.plan import (Fit, candidate_layouts, fitting_layouts, plan_memory,  # noqa: E402
                                                 smallest_peak)

FAMILIES = {
    "Ulysses, no SP": lambda lay: lay.ring == 1 and not lay.sp,
    "Ulysses + SP": lambda lay: lay.ring == 1 and lay.sp,
    "ring / hybrid": lambda lay: lay.ring > 1,
}


def _cell(fits: List[Fit], shape: DiTShape, closest: Optional[str]) -> str:
    if not fits:
        return closest or "none"
    best = fits[0]
    lay = best.layout
    optimizer = ", DO" if lay.distributed_optimizer else ""
    recomputed = lay.recompute.recomputed_layers(shape.num_layers)
    return f"{lay.flags()}, rc {recomputed}{optimizer}: {best.plan.peak / GIB:.0f} ({len(fits)})"


def _closest(shape: DiTShape, workload: Workload, world: int, node_size: Optional[int],
             keep: Optional[Callable[[Layout], bool]]) -> Optional[str]:
    """"none (lowest N)": the lowest peak of any layout (of the family `keep`), with full recompute."""
    if keep is None:
        closest = smallest_peak(shape, workload, world, Training(), node_size=node_size)
    else:
        plans = [plan_memory(shape, workload, replace(lay, recompute=Recompute("block", shape.num_layers)))
                 for lay in candidate_layouts(shape, workload, world, node_size) if keep(lay)]
        closest = min(plans, key=lambda plan: plan.peak, default=None)
    return f"none (lowest {closest.peak / GIB:.0f})" if closest is not None else None


def cell(shape: DiTShape, workload: Workload, world: int, device_gib: float, margin: float,
         node_size: Optional[int] = None, keep: Optional[Callable[[Layout], bool]] = None) -> str:
    fits = fitting_layouts(shape, workload, world, device_gib * (1 - margin) * GIB, Training(), node_size=node_size)
    if keep is not None:
        fits = [fit for fit in fits if keep(fit.layout)]
    return _cell(fits, shape, None if fits else _closest(shape, workload, world, node_size, keep))


def _workload(frames: int) -> Workload:
    vae = VAEShape()
    h, w = vae.latent_size(544, 992)
    return Workload(1, vae.latent_frames(frames), h, w)


def table(worlds: List[int], devices: List[float], margin: float, node_size: Optional[int]) -> str:
    lines = ["| task | frames (tokens) | ranks | " + " | ".join(f"{d:g} GB" for d in devices) + " |",
             "|---|---|---|" + "---|" * len(devices)]
    for task in ("t2v", "i2v"):
        shape = DiTShape(i2v=task == "i2v")
        for frames in (136, 204):
            workload = _workload(frames)
            tokens = workload.tokens(shape.patch_size)
            for world in worlds:
                cells = [cell(shape, workload, world, d, margin, node_size) for d in devices]
                lines.append(f"| {task} | {frames} ({tokens:,}) | {world} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_table(worlds: List[int], devices: List[float], margin: float, node_size: Optional[int]) -> str:
    shape, workload = DiTShape(), _workload(204)
    lines = ["| ranks | layouts | " + " | ".join(f"{d:g} GB" for d in devices) + " |",
             "|---|---|" + "---|" * len(devices)]
    for world in worlds:
        for name, keep in FAMILIES.items():
            cells = [cell(shape, workload, world, d, margin, node_size, keep) for d in devices]
            lines.append(f"| {world} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--devices", type=float, nargs="+", default=[64, 80, 96, 141],
                        help="device memory, GB (2^30)")
    parser.add_argument("--margin", type=float, default=0.10, help="fraction of device memory kept free")
    parser.add_argument("--node-size", type=int, default=8, help="devices per node: TP divides it (0: any TP)")
    parser.add_argument("--family-worlds", type=int, nargs="*", default=[8, 16, 32, 64, 96],
                        help="world sizes of the second table (t2v, 204 frames, by family); none: no second table")
    args = parser.parse_args(argv)
    node_size = args.node_size or None
    print(table(args.worlds, args.devices, args.margin, node_size))
    if args.family_worlds:
        print()
        print(family_table(args.family_worlds, args.devices, args.margin, node_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
