"""Peak host memory of a training step: LoRA pretraining, LoRA-DPO (one DiT), full pretraining, full DPO (two DiTs).

    python benchmarks/lora_dpo_memory.py                      # 4 layers, 8 heads x 128 (hidden 1024), bf16
    python benchmarks/lora_dpo_memory.py --layers 2 --heads 16

Each mode trains 2 iterations through the real entry point (`pretrain(argv, spec)`, --bf16, one process, the
extracted-feature data of the tests) in a fresh subprocess, and reports the process's peak RSS above what it held
after the imports (ru_maxrss minus the RSS before the DiT is built). Pretraining runs 2 videos per micro-batch, DPO
one pair (also 2 videos), so every mode puts the same number of videos through the DiT; the latents are small, so
weights, gradients and optimizer states dominate, as they do at 30B with recompute. Prints one line per mode, the
ratios to LoRA pretraining, what a second (reference) DiT costs (full DPO minus full pretraining), and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("lora-pretrain", "lora-dpo", "full-pretrain", "full-dpo")
LORA = ["--lora-target-modules", "attn1.proj_qkv", "attn1.proj_out", "attn2.proj_q", "attn2.proj_kv",
        "attn2.proj_out", "--lora-r", "16", "--lora-alpha", "32"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _write_configs(work: Path, layers: int, heads: int, head_dim: int) -> dict:
    sys.path.insert(0, str(REPO))
    from mindspeed_mm.tiny.dit import write_tiny_dit
    from tests.helpers.training_fixtures import TINY_DIT, write_dpo_configs

    paths = write_dpo_configs(work)  # tiny DiT + 4 feature pairs; the DiT is replaced by a wider one below
    dit = write_tiny_dit(work / "wide_transformer", num_shards=1, num_layers=layers, num_heads=heads,
                         head_dim=head_dim, in_channels=TINY_DIT["in_channels"],
                         caption_channels=TINY_DIT["caption_channels"])
    model = json.loads(paths["model"].read_text())
    model["predictor"].update(from_pretrained=str(dit), num_layers=layers, num_heads=heads, head_dim=head_dim,
                              channel_split=[head_dim // 2, head_dim // 4, head_dim // 4])
    paths["model"].write_text(json.dumps(model))
    # Pretraining reads the same feature files, one video per row (the pairs' winners and losers).
    rows = [json.loads(line) for line in (work / "w" / "features_data" / "data.jsonl").read_text().splitlines()]
    single = [{"file": f, "captions": r["captions"]} for r in rows for f in (r["file"], r["file_rejected"])]
    data = json.loads(paths["data"].read_text())
    single_path = work / "w" / "features_data" / "single.jsonl"
    single_path.write_text("".join(json.dumps(r) + "\n" for r in single))
    data["dataset_param"]["basic_parameters"]["data_path"] = str(single_path)
    (work / "w" / "data_single.json").write_text(json.dumps(data))
    return {"model": str(paths["model"]), "data_dpo": str(paths["data"]), "data": str(work / "w" / "data_single.json")}


def _child(mode: str, work: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401

    from mindspeed_mm.training import pretrain
    from mindspeed_mm.training.spec import DPO, PRETRAIN
    from tests.helpers.training_fixtures import train_argv

    paths = json.loads((work / "paths.json").read_text())
    dpo = mode.endswith("dpo")
    run_paths = {"model": paths["model"], "data": paths["data_dpo" if dpo else "data"]}
    extra = ["--bf16", "--use-distributed-optimizer"] + (LORA if mode.startswith("lora") else []) \
        + (["--dpo-beta", "0.1"] if dpo else [])
    argv = train_argv(run_paths, work / f"save_{mode}", iters=2, gbs=1 if dpo else 2, mbs=1 if dpo else 2,
                      extra=extra + ["--save-interval", "1000"])
    baseline = _rss_mib()
    pretrain(argv, DPO if dpo else PRETRAIN)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"mode": mode, "peak_mib": peak, "above_imports_mib": peak - baseline}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="lora_dpo_mem_"))
    (work / "paths.json").write_text(json.dumps(_write_configs(work, args.layers, args.heads, args.head_dim)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    results = {}
    hidden = args.heads * args.head_dim
    print(f"DiT: {args.layers} layers, hidden {hidden} ({args.heads} x {args.head_dim}), bf16, CPU, 2 iterations")
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work)], env=env,
                              capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{mode} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        results[mode] = json.loads(line[len("RESULT "):])
    base = results["lora-pretrain"]["above_imports_mib"]
    for mode in MODES:
        r = results[mode]
        print(f"{mode:14s} peak RSS {r['peak_mib']:8.0f} MiB, above imports {r['above_imports_mib']:8.0f} MiB "
              f"({r['above_imports_mib'] / base:.2f}x LoRA pretraining)")
    full = results["full-pretrain"]["above_imports_mib"]
    print(f"full DPO / full pretraining: {results['full-dpo']['above_imports_mib'] / full:.2f}x; "
          f"LoRA-DPO / LoRA pretraining: {results['lora-dpo']['above_imports_mib'] / base:.2f}x")
    # What a second DiT costs, measured: full DPO holds the reference on top of full pretraining's state.
    copy = results["full-dpo"]["above_imports_mib"] - full
    print(f"a second (reference) DiT costs {copy:.0f} MiB here (full DPO - full pretraining): LoRA-DPO with a "
          f"separate reference would need about {(base + copy) / base:.2f}x LoRA pretraining")
    print(json.dumps({"layers": args.layers, "hidden": hidden, "results": results}))


if __name__ == "__main__":
    main()
