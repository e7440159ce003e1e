"""Sampling speed-ups against the error they cost in the final latents, on the tiny trained model.

    python examples/stepvideo/tiny/run_pipeline.py --workdir outputs/tiny_run     # once: trains the tiny DiT
    python benchmarks/sampling_speedups.py --workdir outputs/tiny_run [--steps 30] [--thresholds 0.05 0.1 0.2]

Loads the tiny demo's pretrained DiT (`<workdir>/train`) with its inference JSON, encodes the demo's prompts once,
and samples the same videos (same seeds) with the first-block step cache at each threshold
(`pipeline_config.first_block_cache_threshold`) and without it. Prints, per threshold: the steps that ran every
block, the DiT block passes saved, the wall-time speed-up of the sampling loop over the uncached loop (the median of
`--repeats` runs), and the error of the final latents, mean |cached - uncached| / mean |uncached|. On the tiny
model the wall time is mostly per-step overhead, so the block passes saved are the figure that carries over to the
30B model, where the blocks are nearly all of a step.

`--cfg-parallel` also times CFG parallel, which is exact, where the DiT's compute dominates a step as it does at
30B: a wider random-weight DiT (`--cfg-width`, `--cfg-layers`, 17x256x512 video: 1,536 tokens) with the tiny
encoders, the sampling loop on 2 gloo ranks (torchrun, one thread each; rank 0 the conditional and rank 1 the
unconditional half) against one process with one thread. Prints the speed-up and the largest latent difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.config import from_dict  # noqa: E402
from mindspeed_mm.config.model import MMModelConfig  # noqa: E402
from mindspeed_mm.inference import StepVideoPipeline  # noqa: E402
from mindspeed_mm.models.ae import StepVideoVAE  # noqa: E402
from mindspeed_mm.models.predictor import StepVideoDiT  # noqa: E402
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder  # noqa: E402


def _pipeline(work: Path, steps: int) -> tuple:
    path = work / "configs" / "inference_t2v_model.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: run examples/stepvideo/tiny/run_pipeline.py --workdir {work} first.")
    cfg = from_dict(MMModelConfig, json.loads(path.read_text()), source=str(path))
    cfg.diffusion.num_inference_timesteps = steps
    dit = StepVideoDiT.from_pretrained(str(work / "train"), cfg.predictor).eval()
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    pipe = StepVideoPipeline.from_config(cfg, dit, StepVideoVAE.from_config(cfg.ae), encoder, None)
    prompts = [line for line in Path(cfg.prompt).read_text(encoding="utf-8").splitlines() if line.strip()]
    return pipe, pipe.encode_prompts(prompts), len(prompts)


def _sample(pipe, text, n: int, threshold: float, repeats: int):
    pipe.first_block_cache_threshold = threshold
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            latents = pipe.generate(text=text, seeds=list(range(1234, 1234 + n)), output="latent")
        times.append(time.perf_counter() - start)
    return latents, statistics.median(times), pipe.last_cache_stats


def _wide_pipeline(args):
    """The tiny pipeline with a wider random-weight DiT (same channels) and a larger video: compute-bound steps."""
    from dataclasses import replace

    pipe, text, n = _pipeline(Path(args.workdir), args.cfg_steps)
    cfg = replace(pipe.dit.predictor_config, num_layers=args.cfg_layers, num_heads=args.cfg_width // 128,
                  head_dim=128, channel_split=[64, 32, 32], from_pretrained=None)
    torch.manual_seed(0)
    pipe.dit = StepVideoDiT.build(cfg, device="cpu").eval()
    pipe.num_frames, pipe.height, pipe.width = 17, 256, 512
    pipe.latent_frames = pipe.vae.latent_frames(17)
    return pipe, text, n


def _timed_denoise(pipe, text, n: int, repeats: int):
    from mindspeed_mm.inference.pipeline import make_generator

    times = []
    for _ in range(repeats):
        noise = pipe.prepare_latents([make_generator(1234 + k) for k in range(n)])
        start = time.perf_counter()
        latents = pipe.denoise(noise, text)
        times.append(time.perf_counter() - start)
    return latents, statistics.median(times)


def _cfg_parallel_child(args) -> None:
    """On each of 2 ranks: the sampling loop with the CFG-parallel group; rank 0 saves the time and latents."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    pipe, text, n = _wide_pipeline(args)
    pipe.cfg_group = group
    latents, seconds = _timed_denoise(pipe, text, n, args.repeats)
    if dist.get_rank() == 0:
        torch.save({"latents": latents, "seconds": seconds}, args.cfg_parallel_child)
    dist.destroy_process_group()


def _cfg_parallel(args) -> dict:
    import os
    import subprocess
    import tempfile

    pipe, text, n = _wide_pipeline(args)
    base, base_s = _timed_denoise(pipe, text, n, args.repeats)
    out = Path(tempfile.mkdtemp()) / "cfg.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MINDSPEED_MM_DEVICE="cpu", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--workdir", args.workdir, "--cfg-steps", str(args.cfg_steps), "--cfg-width", str(args.cfg_width),
           "--cfg-layers", str(args.cfg_layers), "--repeats", str(args.repeats), "--cfg-parallel-child", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the CFG-parallel run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    got = torch.load(out)
    diff = (got["latents"] - base).abs().max().item()
    print(f"CFG parallel, DiT hidden {args.cfg_width} x {args.cfg_layers} layers, 1,536 tokens, {args.cfg_steps} "
          f"steps: 2 ranks (1 thread each) {got['seconds']:.2f} s vs one process (1 thread) {base_s:.2f} s: "
          f"{base_s / got['seconds']:.2f}x, max |latent difference| {diff:.2e}")
    return {"speedup": base_s / got["seconds"], "max_latent_difference": diff}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="outputs/tiny_run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cfg-parallel", action="store_true", help="also time CFG parallel on 2 gloo ranks")
    p.add_argument("--cfg-width", type=int, default=1024, help="CFG parallel: the DiT's hidden size (x 128 heads)")
    p.add_argument("--cfg-layers", type=int, default=4)
    p.add_argument("--cfg-steps", type=int, default=3)
    p.add_argument("--cfg-parallel-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cfg_parallel_child:
        _cfg_parallel_child(args)
        return
    pipe, text, n = _pipeline(Path(args.workdir), args.steps)
    layers = len(pipe.dit.transformer_blocks)
    base, base_s, _ = _sample(pipe, text, n, 0.0, args.repeats)
    print(f"tiny trained DiT ({layers} layers), {n} videos, {args.steps} steps, guidance "
          f"{pipe.guidance_scale:g}, {torch.get_num_threads()} thread(s); uncached loop {base_s:.2f} s")
    print("threshold | full steps | block passes saved | speed-up | latent error")
    rows = []
    for threshold in args.thresholds:
        latents, seconds, (full, reused) = _sample(pipe, text, n, threshold, args.repeats)
        saved = reused * (layers - 1) / (args.steps * layers)
        error = ((latents - base).abs().mean() / base.abs().mean()).item()
        rows.append({"threshold": threshold, "full_steps": full, "reused_steps": reused, "passes_saved": saved,
                     "speedup": base_s / seconds, "latent_error": error})
        print(f"{threshold:9.3g} | {full:4d}/{args.steps:<5d} | {saved:18.1%} | {base_s / seconds:7.2f}x | "
              f"{error:.2e}")
    cfg = _cfg_parallel(args) if args.cfg_parallel else None
    print(json.dumps({"steps": args.steps, "layers": layers, "rows": rows, "cfg_parallel": cfg}))


if __name__ == "__main__":
    main()
