"""The memory planner's single-device sampling table for the released model, as in docs/performance.md.

    python benchmarks/sampling_memory_table.py

For each example inference JSON (t2v at 204 x 544 x 992, i2v at 102 x 544 x 992, bf16, guidance 9, one video per
batch, unload_text_encoder true) at TP = CP = 1: the per-phase peaks without offload, with dit_layerwise_offload,
with text_encoder_layerwise_offload too, and then with `ae.use_tiling` and `--use-cfg-parallel` (two devices, each
running one half). Planner figures from the JSON as a user would edit it; nothing is measured here.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mindspeed_mm.tools.memory_plan import GIB  # noqa: E402
from mindspeed_mm.tools.memory_plan.cli import parse_planner_args, sampling_plan  # noqa: E402

EXAMPLES = {"t2v 204 frames": ROOT / "examples/stepvideo/t2v/inference_t2v_model.json",
            "i2v 102 frames": ROOT / "examples/stepvideo/i2v/inference_i2v_model.json"}
SETTINGS = [  # (label, JSON keys, planner flags)
    ("none", {}, []),
    ("DiT", {"dit_layerwise_offload": True}, []),
    ("DiT + Step-LLM", {"dit_layerwise_offload": True, "text_encoder_layerwise_offload": True}, []),
    ("DiT + Step-LLM, VAE tiling", {"dit_layerwise_offload": True, "text_encoder_layerwise_offload": True,
                                    "ae": {"use_tiling": True}}, []),
    ("DiT + Step-LLM, VAE tiling, CFG parallel (2 devices)",
     {"dit_layerwise_offload": True, "text_encoder_layerwise_offload": True, "ae": {"use_tiling": True}},
     ["--use-cfg-parallel"]),
]


def row(task: str, label: str, keys: dict, flags: List[str], folder: Path) -> str:
    cfg = json.loads(EXAMPLES[task].read_text())
    for key, value in keys.items():
        cfg[key] = dict(cfg[key], **value) if isinstance(value, dict) else value
    path = folder / "inference.json"
    path.write_text(json.dumps(cfg))
    _, plan = sampling_plan(parse_planner_args(["--mm-model", str(path), "--bf16", "--inference"] + flags))
    phases = [plan.phase_total(p) / GIB for p in plan.phases]
    return (f"| {task} | {label} | " + " | ".join(f"{v:.1f}" for v in phases)
            + f" | {plan.peak / GIB:.1f} ({plan.peak_phase}) |")


def main() -> int:
    lines = ["| task | offloaded | encode text | sample | decode | peak |", "|---|---|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for task in EXAMPLES:
            for label, keys, flags in SETTINGS:
                lines.append(row(task, label, keys, flags, Path(tmp)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
