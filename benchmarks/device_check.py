"""One device check: what the project wants measured on one NVIDIA GPU, in one run of under 8 minutes.

    bash benchmarks/device_check.sh                              # on the GPU machine: writes to $OUT
    python benchmarks/device_check.py [--out DIR] [--budget-s 450] [--steps golden,dit_train,memory_plan]
    python benchmarks/device_check.py --dry --out DIR            # on the CPU at tiny sizes, in seconds

It writes DIR/device_check.json (the card, torch and CUDA versions, and each step's status, seconds, figures and
details) and DIR/device_check.md (one row per figure, naming the card), rewritten after every step so that a run cut
short keeps what it measured, and prints the table at the end. DIR is --out, else $OUT, else device_check_out/.

The steps, in this order. They run in worker processes: pytest in one of its own, the measurements together in
another (each process start costs seconds of imports and a CUDA context). A step is killed with its process when past
its time limit; a step that fails (an error, a crash, the limit) is recorded with its error and its process ends, and
the steps after it run in a fresh process (a CUDA error can leave a context unusable). The exit status is 1 when any
step failed.

  tests        a pytest subset with MINDSPEED_MM_DEVICE=cuda (the runtime's device switch): tests that build their
               models on the runtime's device (the DiT goldens, the DiT model tests) then run there; pass/fail counts
               and the failing tests. (MINDSPEED_MM_TEST_DEVICE selects the device of tests/distributed, whose cases
               all need two or more ranks: not runnable on one GPU.)
  golden       the golden DiT cases (tests/golden/stepvideo, computed by the official code in float32) on the device:
               max and mean |error| in bf16 with attention backend sdpa and flash (flash only where flash_attn
               imports), and in fp32 with TF32 off (must meet the golden tolerance) and with torch's defaults.
  dit_train    benchmarks/dit_step.py's training step at real width (hidden 6144 = 48 heads x 128, 2 blocks, bf16) at
               12,648 and 35,836 tokens, without recompute and with both blocks recomputed: step time, tokens/s,
               TFLOP/s, MFU, peak memory and the activations' share of it (weight gradients freed as Megatron's DDP
               does).
  sampling     one sampling step: the same DiT's forward at classifier-free-guidance batch 2 (cond + uncond), at both
               token counts; the time extrapolated to the released 48 blocks by the FLOP count. Then the larger one
               with dit_layerwise_offload over 4 blocks: time per block against the resident forward's (does the
               copy hide?), bytes copied and peak memory.
  vae          benchmarks/vae.py: the Video-VAE (real widths, bf16) encoding and decoding one 17-frame 544x992 chunk,
               untiled and tiled with the model's default windows (256 px overlapping by 64): time and peak memory.
  memory_plan  each measured peak against the memory planner (mindspeed_mm.tools.memory_plan): the DiT training
               step's activations, the sampling forward's working set (the sampling plan's forward term) and the VAE
               encode; ratio measured/predicted.

--budget-s bounds the whole run: a step, or a configuration inside one, whose estimated time does not fit in what is
left is skipped with the reason recorded. The estimates are guesses made before any GPU run (DEVICE_PROFILE).
--dry runs every step on the CPU at tiny sizes (tests/test_device_check.py): it proves the script, not the figures.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(REPO))

STEPS = ("tests", "golden", "dit_train", "sampling", "vae", "memory_plan")
GIB = 2**30
JSON_NAME, TABLE_NAME = "device_check.json", "device_check.md"

# Golden parity in bf16. On the CPU the bf16 DiT differs from the float32 golden by at most 0.038 (mean 0.0074) for
# outputs of magnitude up to 3.8; a wrong layout, RoPE split, timestep scale or mask moves it by 0.5 to 3.5 (the
# golden README). Bounds between the two: a kernel's rounding passes, an arithmetic error does not.
BF16_MAX_ABS_ERROR = 0.15
BF16_MEAN_ABS_ERROR = 0.02
# The planner's validation tolerance (benchmarks/memory_plan_validation.py); beyond it a ratio is flagged.
PLANNER_TOLERANCE = 0.15


@dataclass(frozen=True)
class Profile:
    """Sizes and time estimates of one kind of run: the device's, or the dry run's on the CPU."""

    device_type: str
    heads: int
    head_dim: int
    latent_sizes: Tuple[Tuple[int, int, int], ...]  # (frames, height, width) latent sizes of the DiT steps
    caption_channels: Tuple[int, int]
    llm_len: int
    clip_len: int
    warmup: int
    timed_steps: int
    vae_args: Tuple[str, ...]
    tests: Tuple[str, ...]
    # Seconds a step is expected to take (the budget skips it when less is left) and the most it may take (it is
    # killed then).
    estimate_s: Dict[str, float]
    limit_s: Dict[str, float]
    layers: int = 2
    sampling_layers: int = 48  # the released DiT's, for the extrapolated sampling step
    offload_layers: int = 4  # the offloaded forward: more blocks than the two on the device at a time


DEVICE_PROFILE = Profile(
    device_type="cuda", heads=48, head_dim=128,
    # 544 x 992 frames are 34 x 62 latents; 2 and 5 VAE chunks (34 and 85 frames) give 6 and 17 latent frames.
    latent_sizes=((6, 34, 62), (17, 34, 62)),
    caption_channels=(6144, 1024), llm_len=320, clip_len=77, warmup=1, timed_steps=3,
    # The model's default tiling (VAEConfig: use_tiling off, tile_sample_size 256, tile_overlap 64).
    vae_args=("--dtype", "bf16", "--sizes", "17x544x992", "--tile", "256", "--overlap", "64", "--widths", "real"),
    tests=("tests/test_runtime.py", "tests/test_dit_golden.py", "tests/test_dit_model.py", "tests/test_vae_golden.py",
           "tests/test_dit_benchmark.py"),
    estimate_s={"tests": 60, "golden": 30, "dit_train": 100, "sampling": 60, "vae": 70, "memory_plan": 1},
    limit_s={"tests": 180, "golden": 120, "dit_train": 240, "sampling": 200, "vae": 200, "memory_plan": 30},
)

DRY_PROFILE = Profile(
    device_type="cpu", heads=4, head_dim=16, latent_sizes=((3, 8, 12), (6, 8, 12)),
    caption_channels=(64, 32), llm_len=16, clip_len=8, warmup=0, timed_steps=1,
    # The golden case's reduced VAE widths (the real ones take 10 s to draw on a 2-core CPU), fp32 as on the CPU.
    # Two overlapping 32-px windows across a 32 x 48 frame: the tiled path blends.
    vae_args=("--dtype", "fp32", "--sizes", "17x32x48", "--tile", "32", "--overlap", "16", "--widths", "test"),
    tests=("tests/test_dit_golden.py", "tests/test_dit_benchmark.py::test_flop_count_at_real_width"),
    estimate_s={"tests": 6, "golden": 5, "dit_train": 4, "sampling": 3, "vae": 8, "memory_plan": 1},
    limit_s={"tests": 60, "golden": 60, "dit_train": 60, "sampling": 60, "vae": 60, "memory_plan": 10},
)


class DeliberateFailure(RuntimeError):
    """Raised by --fail-step, to prove that a failing step is recorded and sets the exit status."""


# --- what a step records --------------------------------------------------------------------


@dataclass
class StepRecord:
    """A step's outcome as the JSON holds it; a worker process saves its own after every figure."""

    status: str = "ok"  # ok, failed, skipped
    seconds: float = 0.0
    reason: str = ""  # why a step was skipped
    figures: List[dict] = field(default_factory=list)
    errors: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)  # configurations inside the step that were skipped
    notes: List[str] = field(default_factory=list)
    details: Dict[str, dict] = field(default_factory=dict)
    output_tail: str = ""
    path: Optional[Path] = None  # where a worker saves it

    def figure(self, item: str, name: str, value, unit: str = "", note: str = "") -> None:
        self.figures.append({"item": item, "figure": name, "value": value, "unit": unit, "note": note})
        self.save()

    def error(self, item: str, message: str, trace: str = "") -> None:
        self.errors.append({"item": item, "error": message, "traceback": trace})
        self.save()

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})
        self.save()

    def as_json(self) -> dict:
        out = {"status": self.status, "seconds": round(self.seconds, 2)}
        if self.reason:
            out["reason"] = self.reason
        out.update(figures=self.figures, errors=self.errors, skipped=self.skipped, notes=self.notes,
                   details=self.details)
        if self.output_tail:
            out["output_tail"] = self.output_tail
        return out

    @classmethod
    def from_json(cls, data: dict) -> "StepRecord":
        return cls(status=data.get("status", "ok"), seconds=data.get("seconds", 0.0), reason=data.get("reason", ""),
                   figures=data.get("figures", []), errors=data.get("errors", []), skipped=data.get("skipped", []),
                   notes=data.get("notes", []), details=data.get("details", {}))

    def save(self) -> None:
        if self.path is not None:
            _write_atomically(self.path, json.dumps(self.as_json(), indent=1, default=str))


def _write_atomically(path: Path, text: str) -> None:
    # A step killed at its time limit must leave a whole file behind, never half of one.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


# --- the steps, each in a worker process ----------------------------------------------------


def _load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _release_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokens(size: Tuple[int, int, int]) -> int:
    frames, height, width = size
    return frames * height * width


def _size_label(size: Tuple[int, int, int]) -> str:
    return f"{_tokens(size):,} tokens ({'x'.join(str(v) for v in size)})"


class OutcomeCounter:
    """A pytest plugin that counts outcomes and keeps the failing tests' last error line."""

    def __init__(self):
        self.counts = collections.Counter()
        self.failures: List[dict] = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.counts[report.outcome] += 1
        elif report.failed:
            self.counts["error"] += 1  # a fixture's setup or teardown failed
        elif report.skipped:
            self.counts["skipped"] += 1
        if report.failed:
            lines = [line for line in str(report.longreprtext).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("E ")]
            self.failures.append({"test": report.nodeid, "phase": report.when,
                                  "message": (errors or lines or [""])[-1][:400]})


def step_tests(profile: Profile, record: StepRecord, deadline: float) -> None:
    import pytest

    # The runtime's device switch: tests that build models without naming a device build them on this one.
    os.environ["MINDSPEED_MM_DEVICE"] = profile.device_type
    counter = OutcomeCounter()
    exit_code = pytest.main(["-q", "-p", "no:cacheprovider", *profile.tests], plugins=[counter])
    item = f"pytest, MINDSPEED_MM_DEVICE={profile.device_type}"
    files = ", ".join(profile.tests)
    for outcome in ("passed", "failed", "error", "skipped"):
        record.figure(item, f"tests {outcome}", counter.counts[outcome], "", files if outcome == "passed" else "")
    record.details["pytest"] = {"files": list(profile.tests), "exit_code": int(exit_code),
                                "counts": dict(counter.counts), "failures": counter.failures}
    for failure in counter.failures:
        record.error(failure["test"], failure["message"])
    if int(exit_code) != 0 and not counter.failures:
        record.error(item, f"pytest exited with {int(exit_code)} (nothing collected, or interrupted)")


def golden_dir() -> Path:
    """The project's shared golden set when this checkout has it beside it, else the copy under tests/ (the same
    files: the device machine receives the repository alone)."""
    shared = REPO.parent / "shared" / "golden" / "stepvideo"
    return shared if (shared / "dit_t2v.json").is_file() else REPO / "tests" / "golden" / "stepvideo"


def flash_unavailable_reason(device) -> Optional[str]:
    """Why the flash backend cannot run flash-attn's kernel here, or None when it can."""
    if device.type != "cuda":
        return "flash-attn needs CUDA"
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # ImportError, or a build that does not match this torch
        return f"flash_attn is not importable ({_exception_text(exc)})"
    return None


def step_golden(profile: Profile, record: StepRecord, deadline: float) -> None:
    import torch
    from safetensors.torch import load_file

    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.tiny.dit import write_official_dit

    device = torch.device(profile.device_type)
    source = golden_dir()
    record.notes.append(f"golden cases from {source.relative_to(REPO.parent)}")
    flash_reason = flash_unavailable_reason(device)
    # (label, dtype, backend, TF32 allowed); TF32 only exists on CUDA.
    variants = [("fp32 sdpa, TF32 off", "fp32", "sdpa", False)]
    if device.type == "cuda":
        variants.append(("fp32 sdpa, torch defaults (cuDNN TF32 on)", "fp32", "sdpa", None))
    variants.append(("bf16 sdpa", "bf16", "sdpa", False))
    if flash_reason is None:
        variants.append(("bf16 flash", "bf16", "flash", False))
    defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tempfile.TemporaryDirectory() as scratch:
        for case in ("dit_t2v", "dit_ti2v"):
            meta = json.loads((source / f"{case}.json").read_text())
            io = load_file(str(source / f"{case}.io.safetensors"))
            folder = write_official_dit(Path(scratch) / case / "transformer",
                                        load_file(str(source / f"{case}.weights.safetensors")),
                                        meta["constructor_config"])
            split = meta["non_constructor_settings"]["transformer_blocks.*.attn1.rope_ch_split"]
            tolerance = meta["suggested_tolerance"]["output.velocity"]
            want = io["output.velocity"]
            inputs = dict(latents=io["input.hidden_states"], timestep=io["input.timestep"],
                          prompt=[io["input.encoder_hidden_states"], io["input.encoder_hidden_states_2"]],
                          prompt_mask=[io["input.step_llm_mask"],
                                       torch.ones(io["input.encoder_hidden_states_2"].shape[:2])])
            if "input.condition_hidden_states" in io:
                inputs["image_latents"] = io["input.condition_hidden_states"]
                inputs["motion_score"] = meta["motion_score"]
            inputs = {k: [t.to(device) for t in v] if isinstance(v, list) else
                      v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            outputs = {}
            for label, dtype, backend, tf32 in variants:
                item = f"{case} {label}"
                if tf32 is None:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
                else:
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                try:
                    model = StepVideoDiT.from_pretrained(folder, dtype=dtype, channel_split=split,
                                                         attention_backend=backend, device=device).eval()
                    with torch.no_grad():
                        got = model(**inputs).float().cpu()
                except Exception as exc:  # e.g. a flash-attn build that imports but does not run: the others go on
                    record.error(item, _exception_text(exc), traceback.format_exc())
                    continue
                del model
                outputs[label] = got
                diff = (got - want).abs()
                max_error, mean_error = diff.max().item(), diff.mean().item()
                record.details[item] = {"max_abs_error": max_error, "mean_abs_error": mean_error,
                                        "max_abs_golden": want.abs().max().item()}
                if dtype == "fp32":
                    bound = f"golden tolerance rtol {tolerance['rtol']:g}, atol {tolerance['atol']:g}"
                    within = torch.allclose(got, want, rtol=tolerance["rtol"], atol=tolerance["atol"])
                else:
                    bound = f"bound max {BF16_MAX_ABS_ERROR}, mean {BF16_MEAN_ABS_ERROR}"
                    within = max_error <= BF16_MAX_ABS_ERROR and mean_error <= BF16_MEAN_ABS_ERROR
                verdict = "within" if within else "OUTSIDE"
                record.figure(item, "max |error| vs golden", max_error, "", f"{verdict} {bound}")
                record.figure(item, "mean |error| vs golden", mean_error, "")
                # Only the strict variants are held to their bound: TF32 (torch's default for cuDNN convolutions)
                # is the setting the report makes visible, not an error of the model.
                if not within and tf32 is not None:
                    record.error(item, f"max |error| {max_error:.3g}, mean {mean_error:.3g}: {verdict} {bound}")
            if "bf16 flash" in outputs and "bf16 sdpa" in outputs:
                flash_vs_sdpa = (outputs["bf16 flash"] - outputs["bf16 sdpa"]).abs().max().item()
                record.figure(f"{case} bf16", "max |flash - sdpa|", flash_vs_sdpa, "")
            elif flash_reason is not None:
                record.figure(f"{case} bf16 flash", "max |error| vs golden", None, "", f"unavailable: {flash_reason}")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults


def _dit_step_argv(profile: Profile, size: Tuple[int, int, int], layers: int) -> List[str]:
    frames, height, width = size
    return ["--layers", str(layers), "--heads", str(profile.heads), "--head-dim", str(profile.head_dim),
            "--frames", str(frames), "--height", str(height), "--width", str(width),
            "--caption-channels", *(str(c) for c in profile.caption_channels), "--llm-len", str(profile.llm_len),
            "--clip-len", str(profile.clip_len), "--dtype", "bf16", "--device", profile.device_type,
            "--warmup", str(profile.warmup), "--steps", str(profile.timed_steps)]


def _memory_note(mode: dict, what: str) -> str:
    if mode["memory"] == "allocator":
        return f"allocator peak: {what}"
    return "process resident set (CPU): not an allocator figure"


def _mfu_figure(record: StepRecord, item: str, result: dict, mode: dict) -> None:
    if mode["mfu"] is None:
        record.figure(item, "MFU", None, "%", "CUDA only (needs the card's bf16 peak)")
    else:
        record.figure(item, "MFU", 100 * mode["mfu"], "%", f"of {result['peak_tflops']:.0f} TFLOP/s dense bf16; "
                      f"attention {result['attention_backend']}")


def _dit_step_run(dit_step, record: StepRecord, item: str, argv: List[str], per_config: float,
                  deadline: float) -> Optional[dict]:
    """benchmarks/dit_step.py with `argv`, its result kept under `item`; None (recorded as skipped or failed) when
    the budget has no room for it or it raises (out of memory, a kernel error: the next configuration runs)."""
    if time.time() + per_config > deadline:
        record.skip(item, f"budget: under {per_config:.0f} s left")
        return None
    try:
        result = dit_step.run(dit_step.parse_args(argv))
    except Exception as exc:
        record.error(item, _exception_text(exc), traceback.format_exc())
        _release_device_memory()
        return None
    record.details[item] = result
    return result


def step_dit_train(profile: Profile, record: StepRecord, deadline: float) -> None:
    dit_step = _load_benchmark("dit_step")
    # Recompute "block" with every block recomputed (--recompute-layers = layers): the step of a fully recomputed
    # model, whose extra cost over "none" is one more forward of each block.
    configs = [(size, recompute) for size in profile.latent_sizes for recompute in ("none", "block")]
    per_config = profile.estimate_s["dit_train"] / len(configs)
    for size, recompute in configs:
        item = f"train, {_size_label(size)}, recompute {recompute}"
        argv = _dit_step_argv(profile, size, profile.layers) + ["--mode", "train", "--drop-grads"]
        if recompute != "none":
            argv += ["--recompute", recompute, "--recompute-layers", str(profile.layers)]
        result = _dit_step_run(dit_step, record, item, argv, per_config, deadline)
        if result is None:
            continue
        train = result["train"]
        record.figure(item, "step time", train["seconds"] * 1e3, "ms",
                      f"{profile.layers} blocks, hidden {profile.heads * profile.head_dim}, bf16, median of "
                      f"{profile.timed_steps}")
        record.figure(item, "throughput", train["tokens_per_s"], "tokens/s")
        record.figure(item, "model FLOP rate", train["tflops"], "TFLOP/s", "3x forward matmul FLOPs, recompute not "
                      "counted")
        _mfu_figure(record, item, result, train)
        record.figure(item, "peak memory", train["peak_bytes"] / GIB, "GiB",
                      _memory_note(train, "parameters, inputs and activations"))
        record.figure(item, "activations", train["growth_bytes"] / GIB, "GiB",
                      "peak over the memory held before the step; weight gradients freed as completed")
        del result
        _release_device_memory()


def step_sampling(profile: Profile, record: StepRecord, deadline: float) -> None:
    from mindspeed_mm.checkpoint.stepvideo_adapter import default_channel_split
    from mindspeed_mm.config.model import PredictorConfig

    dit_step = _load_benchmark("dit_step")
    per_config = profile.estimate_s["sampling"] / len(profile.latent_sizes)
    resident = {}  # size -> seconds per block of the resident forward
    for size in profile.latent_sizes:
        item = f"sampling step, {_size_label(size)}, CFG batch 2"
        # Classifier-free guidance runs the conditional and the unconditional prediction as one batch of 2.
        argv = _dit_step_argv(profile, size, profile.layers) + ["--mode", "forward", "--batch", "2"]
        result = _dit_step_run(dit_step, record, item, argv, per_config, deadline)
        if result is None:
            continue
        forward = result["forward"]
        record.figure(item, f"forward, {profile.layers} blocks", forward["seconds"] * 1e3, "ms",
                      f"bf16, attention {result['attention_backend']}, median of {profile.timed_steps}")
        released = PredictorConfig(num_layers=profile.sampling_layers, num_heads=profile.heads,
                                   head_dim=profile.head_dim, channel_split=default_channel_split(profile.head_dim),
                                   caption_channels=list(profile.caption_channels))
        full_flops = dit_step.forward_flops(released, 2, _tokens(size), profile.llm_len + profile.clip_len,
                                            profile.llm_len)
        full_seconds = forward["seconds"] * full_flops / result["forward_flops"]
        record.figure(item, f"one step at {profile.sampling_layers} blocks (extrapolated)", full_seconds, "s",
                      f"measured {profile.layers}-block time x FLOPs ratio {full_flops / result['forward_flops']:.1f};"
                      f" 50 steps: {50 * full_seconds / 60:.1f} min")
        record.figure(item, "throughput", forward["tokens_per_s"], "tokens/s", "both CFG samples counted")
        _mfu_figure(record, item, result, forward)
        record.figure(item, "peak memory", forward["peak_bytes"] / GIB, "GiB",
                      _memory_note(forward, f"{profile.layers} blocks' parameters, inputs and the forward"))
        record.figure(item, "forward working memory", forward["growth_bytes"] / GIB, "GiB",
                      "peak over the memory held before the forward")
        resident[size] = forward["seconds"] / profile.layers
        del result
        _release_device_memory()
    _sampling_offloaded(profile, record, deadline, resident)


def _sampling_offloaded(profile: Profile, record: StepRecord, deadline: float, resident: Dict) -> None:
    """The same forward with dit_layerwise_offload at the largest size, with more blocks than the two resident
    ones: does the copy of the next block hide behind the running one's compute?"""
    dit_step = _load_benchmark("dit_step")
    size, layers = profile.latent_sizes[-1], profile.offload_layers
    item = f"sampling step, dit_layerwise_offload, {_size_label(size)}, {layers} blocks"
    per_config = profile.estimate_s["sampling"] / len(profile.latent_sizes)
    if size not in resident:
        record.skip(item, "the resident forward at this size did not run")
        return
    argv = _dit_step_argv(profile, size, layers) + ["--mode", "forward", "--batch", "2", "--offload"]
    result = _dit_step_run(dit_step, record, item, argv, per_config, deadline)
    if result is None:
        return
    forward = result["forward"]
    per_block = forward["seconds"] / layers
    record.figure(item, f"forward, {layers} blocks", forward["seconds"] * 1e3, "ms",
                  f"blocks in pinned host memory, median of {profile.timed_steps}")
    record.figure(item, "time per block, offloaded / resident", per_block / resident[size], "x",
                  "1.0: the copies hide behind the compute")
    record.figure(item, "copied per forward", layers * result["block_bytes"] / GIB, "GiB",
                  f"{result['block_bytes'] / GIB:.2f} GiB a block; "
                  f"{result['block_bytes'] / per_block / 1e9:.1f} GB/s needed to hide it")
    record.figure(item, "peak memory", forward["peak_bytes"] / GIB, "GiB",
                  _memory_note(forward, "the parts outside the blocks, two blocks, inputs and the forward"))
    del result
    _release_device_memory()


def step_vae(profile: Profile, record: StepRecord, deadline: float) -> None:
    vae_benchmark = _load_benchmark("vae")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "vae.json"
        vae_benchmark.main(["--device", profile.device_type, "--modes", "untiled,tiled", *profile.vae_args,
                            "--json", str(out)])
        result = json.loads(out.read_text())
    record.details["vae"] = result
    widths = "real widths" if result["widths"] == "real" else "test widths (a smoke run)"
    for row in result["rows"]:
        tiling = f"tiled {result['tile']}/{result['overlap']} px" if row["mode"] == "tiled" else "untiled"
        item = f"VAE {row['frames']}x{row['height']}x{row['width']} {tiling}"
        for stage in ("decode", "encode"):
            record.figure(item, f"{stage} time", row["frames"] / row[f"{stage}_fps"], "s",
                          f"{widths}, {result['dtype'].replace('torch.', '')}, one 17-frame chunk")
            record.figure(item, f"{stage} peak memory", row[f"{stage}_peak_bytes"] / GIB, "GiB",
                          "peak over the memory held before the call")
        if "decode_rel_err" in row:
            record.figure(item, "tiled vs untiled decode", row["decode_rel_err"], "",
                          "mean |tiled - untiled| / std(untiled); random weights")


WORKER_STEPS = {"tests": step_tests, "golden": step_golden, "dit_train": step_dit_train, "sampling": step_sampling,
                "vae": step_vae}


def _exit_with_the_driver() -> None:
    """End this worker when its driver is gone (killed outright, it cannot kill its worker): an orphaned step must
    not keep the GPU busy."""
    driver = os.getppid()

    def watch():
        while os.getppid() == driver:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


RESTART_EXIT_CODE = 3  # a worker that ends after a failed step: the driver starts a fresh one for the rest


def worker_main(steps: List[str], results: Path, budget_end: float, profile: Profile, fail_step: Optional[str],
                stall_step: Optional[str]) -> int:
    """Run `steps` in order in this process, each saving its record to results/<step>.json as it goes and announcing
    itself in results/running.json (step and deadline) for the driver, which kills this process at the deadline."""
    _exit_with_the_driver()
    for step in steps:
        record = StepRecord(path=results / f"{step}.json")
        left = budget_end - time.time()
        if left < profile.estimate_s[step]:
            record.status, record.reason = "skipped", (f"budget: {max(left, 0):.0f} s left, the step takes about "
                                                      f"{profile.estimate_s[step]:.0f} s")
            record.save()
            continue
        started = time.time()
        deadline = min(started + profile.limit_s[step], budget_end)
        _write_atomically(results / "running.json",
                          json.dumps({"step": step, "deadline": deadline, "started": started}))
        print(f"--- {step} (limit {deadline - started:.0f} s) ---", flush=True)
        record.status = "running"
        record.save()
        try:
            if fail_step == step:
                raise DeliberateFailure(f"step {step} failed on purpose (--fail-step {step})")
            if stall_step == step:
                time.sleep(24 * 3600)  # until the driver kills this process at the step's deadline
            WORKER_STEPS[step](profile, record, deadline)
        except Exception as exc:
            record.error(step, _exception_text(exc), traceback.format_exc())
        record.status = "failed" if record.errors else "ok"
        record.seconds = time.time() - started
        record.save()
        if record.errors:
            # A CUDA error other than out-of-memory leaves this process's context unusable: the remaining steps
            # get a fresh process.
            return RESTART_EXIT_CODE
    return 0


# --- memory planner comparison (arithmetic, in the driver) ----------------------------------


def step_memory_plan(profile: Profile, records: Dict[str, StepRecord], record: StepRecord) -> None:
    from mindspeed_mm.tools.memory_plan import DiTShape, Layout, Recompute, Training, Workload, plan_memory
    from mindspeed_mm.tools.memory_plan.dit import sampling_forward
    from mindspeed_mm.tools.memory_plan.encoders import VAEShape, vae_encode_working_bytes

    compared = 0

    def compare(item: str, measured: Optional[int], predicted: int, what: str, comparable: bool, note: str = ""):
        nonlocal compared
        compared += 1
        record.figure(item, "measured", None if measured is None else measured / GIB, "GiB", what)
        record.figure(item, "planner", predicted / GIB, "GiB", note)
        if measured is None or not predicted:
            record.figure(item, "measured / planner", None, "", "no measurement")
            return
        ratio = measured / predicted
        if not comparable:
            flag = "dry run: a CPU resident set at toy sizes against the planner's bytes, not comparable"
        elif abs(ratio - 1) <= PLANNER_TOLERANCE:
            flag = f"within the planner's +-{PLANNER_TOLERANCE:.0%} validation tolerance"
        else:
            flag = f"OUTSIDE the planner's +-{PLANNER_TOLERANCE:.0%} validation tolerance"
        record.figure(item, "measured / planner", ratio, "x", flag)
        record.details[item] = {"measured_bytes": measured, "predicted_bytes": predicted, "ratio": ratio}

    def dit_shape(result: dict) -> DiTShape:
        return DiTShape(num_layers=result["layers"], num_heads=result["heads"], head_dim=result["head_dim"],
                        caption_channels=tuple(profile.caption_channels))

    def workload(result: dict) -> Workload:
        return Workload(batch=result["batch"], latent_frames=result["frames"], latent_height=result["height"],
                        latent_width=result["width"], llm_tokens=profile.llm_len, clip_tokens=profile.clip_len)

    # The planner counts a 2-block model directly (DiTShape.num_layers); TP = CP = DP = 1 as dit_step runs.
    for item, result in records.get("dit_train", StepRecord()).details.items():
        train = result["train"]
        recompute = Recompute(result["recompute"], result["recompute_layers"]) if result["recompute"] != "none" \
            else Recompute()
        plan = plan_memory(dit_shape(result), workload(result), Layout(1, 1, 1, recompute), Training(dtype_bytes=2))
        compare(f"DiT activations: {item}", train["growth_bytes"], plan.activations.peak,
                "peak over parameters and inputs, weight gradients freed",
                train["memory"] == "allocator", "activation peak (plan_memory(...).activations.peak)")
    for item, result in records.get("sampling", StepRecord()).details.items():
        forward = result["forward"]
        shape, work = dit_shape(result), workload(result)
        # The sampling plan's forward term: the largest moment of a forward without autograd.
        predicted = sampling_forward(shape, work, 1, 1, 2).peak
        what = "peak over parameters and inputs"
        if result.get("offload"):  # the blocks arrive during the forward: two of them are part of its growth
            predicted += 2 * result["block_bytes"]
            what += " (two blocks copied in count: dit_layerwise_offload)"
        compare(f"DiT forward: {item}", forward["growth_bytes"], predicted, what,
                forward["memory"] == "allocator", "sampling_forward(...).peak, the planner's sampling term")
    vae = records.get("vae", StepRecord()).details.get("vae")
    if vae:
        element_bytes = 2 if "bfloat16" in vae["dtype"] or "float16" in vae["dtype"] else 4
        for row in vae["rows"]:
            tile = vae["tile"] if row["mode"] == "tiled" else None
            predicted = vae_encode_working_bytes(VAEShape(), 1, row["height"], row["width"], element_bytes, tile)
            label = f"tiled {vae['tile']} px" if tile else "untiled"
            compare(f"VAE encode {row['frames']}x{row['height']}x{row['width']} {label}", row["encode_peak_bytes"],
                    predicted, "peak over weights and input", vae["widths"] == "real" and vae["device"] != "cpu",
                    "vae_encode_working_bytes (released widths; an estimate from CPU float32 on accelerators)")
        record.notes.append("The planner has no term for the VAE decode: decode peaks are reported by the vae step.")
    if not compared:
        record.status = "skipped"
        record.reason = "no measured item: dit_train, sampling and vae did not run"


# --- the driver -----------------------------------------------------------------------------


def device_description(profile: Profile) -> dict:
    import torch

    info = {"type": profile.device_type}
    if profile.device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, count=torch.cuda.device_count(), memory_gib=round(props.total_memory / GIB, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", count=1)
    return info


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> Optional[str]:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run_workers(steps: List[str], profile: Profile, dry: bool, budget_end: float, fail_step: Optional[str],
                stall_step: Optional[str], scratch: Path, on_record) -> Dict[str, StepRecord]:
    """Run the worker steps in as few processes as failures allow: pytest alone (its fixtures and imports stay out
    of the measurements), then the others in one process (each process start costs seconds of imports, and a CUDA
    context). A step past its deadline is killed with its process; a step that fails or dies ends its process. The
    steps after it run in a fresh one. `on_record(step, record)` is called as each step ends."""
    records: Dict[str, StepRecord] = {}
    pending = list(steps)
    while pending:
        batch = pending[:1] if pending[0] == "tests" else [s for s in pending if s != "tests"]
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(batch), "--results",
                   str(scratch), "--budget-end", repr(budget_end)]
        command += ["--dry"] * dry + ["--fail-step", fail_step] * bool(fail_step)
        command += ["--stall-step", stall_step] * bool(stall_step)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if dry:
            env["MINDSPEED_MM_DEVICE"] = "cpu"
        for name in [*batch, "running"]:
            (scratch / f"{name}.json").unlink(missing_ok=True)
        # A process group of its own, so that a kill takes the worker's children too (pytest's, torch's); in this
        # session, not a new one, so that whatever ends the driver's session ends the workers as well.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", **group)
        tail = collections.deque(maxlen=60)

        def echo(stream=process.stdout, lines=tail):
            for line in stream:
                print(line, end="", flush=True)
                lines.append(line)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        killed = None
        try:
            while process.poll() is None:
                running = _read_json(scratch / "running.json")
                if running and time.time() > running["deadline"]:
                    killed = running["step"]
                    break
                _collect(batch, scratch, records, on_record)
                time.sleep(0.2)
        finally:  # the deadline, or the driver interrupted: no worker outlives it holding the GPU
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(timeout=5)
        _collect(batch, scratch, records, on_record)
        for step in batch:
            if step in records:
                continue
            record = StepRecord.from_json(_read_json(scratch / f"{step}.json") or {"status": "pending"})
            if record.status == "pending":
                continue  # not reached: the next process runs it
            if step == killed:
                message = "killed at its time limit; what it measured before is kept"
            else:
                message = f"its process ended with exit code {process.returncode} during the step"
            record.errors.append({"item": step, "error": message, "traceback": ""})
            record.status = "failed"
            record.output_tail = "".join(tail)[-4000:]
            running = _read_json(scratch / "running.json") or {}
            record.seconds = time.time() - running.get("started", time.time())
            records[step] = record
            on_record(step, record)
        for step in batch:
            if step in records and records[step].status == "failed" and not records[step].output_tail:
                records[step].output_tail = "".join(tail)[-4000:]
        left = [s for s in pending if s not in records]
        if left == pending:  # the process ended before reaching any step: do not start it again and again
            for step in left:
                records[step] = StepRecord(status="failed", errors=[{
                    "item": step, "error": f"the worker process ended with exit code {process.returncode} before "
                    "the step started", "traceback": ""}], output_tail="".join(tail)[-4000:])
                on_record(step, records[step])
            left = []
        pending = left
    return records


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _collect(batch: List[str], scratch: Path, records: Dict[str, StepRecord], on_record) -> None:
    """Take over the records of the steps that have ended."""
    for step in batch:
        if step in records:
            continue
        data = _read_json(scratch / f"{step}.json")
        if data and data.get("status") in ("ok", "failed", "skipped"):
            records[step] = StepRecord.from_json(data)
            on_record(step, records[step])


def format_value(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,} {unit}".strip()
    if unit == "GiB":
        text = f"{value:.3f}" if value < 10 else f"{value:.1f}"
    elif unit == "x":
        return f"{value:.2f}x"
    elif value == 0 or abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.1f}"
    elif abs(value) >= 0.01:
        text = f"{value:.3g}"
    else:
        text = f"{value:.2e}"
    return f"{text}%" if unit == "%" else f"{text} {unit}".strip()


def markdown(report: dict) -> str:
    device = report["device"]
    title = "dry run on the CPU" if report["mode"] == "dry" else "device run"
    lines = [f"# Device check: {device['name']} ({title})", "",
             f"torch {report['torch']}, CUDA {report['cuda'] or 'none'}, flash-attn "
             f"{report['flash_attn'] or 'not installed'}, commit {report['commit'] or 'unknown'}, "
             f"{report['started']}; {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        note = step.get("reason", "")
        if step["errors"]:
            note = "; ".join(f"{e['item']}: {e['error']}" for e in step["errors"][:3])
            if len(step["errors"]) > 3:
                note += f"; and {len(step['errors']) - 3} more"
        if step["skipped"]:
            note = "; ".join([note] * bool(note) + [f"skipped {s['item']} ({s['reason']})" for s in step["skipped"]])
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.1f} | {_cell(note)} |")
    lines += ["", f"Figures on {device['name']}:", "", "| step | item | figure | value | note |",
              "|---|---|---|---|---|"]
    for name, step in report["steps"].items():
        for fig in step["figures"]:
            lines.append(f"| {name} | {_cell(fig['item'])} | {_cell(fig['figure'])} | "
                         f"{format_value(fig['value'], fig['unit'])} | {_cell(fig['note'])} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else device_check_out/)")
    parser.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes: proves the script in seconds")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time for the whole run (default 450 s)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    # For tests: make the named step fail on purpose, or hang until its time limit kills it, in its own process.
    parser.add_argument("--fail-step", default=None, choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--stall-step", default=None, choices=sorted(WORKER_STEPS), help=argparse.SUPPRESS)
    # The driver starts the steps as `--worker STEP,STEP --results DIR --budget-end T`.
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget-end", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.worker is not None:
        args.worker = args.worker.split(",")
        if set(args.worker) - set(WORKER_STEPS):
            parser.error(f"--worker: {args.worker} are not all worker steps")
    return args


def run_memory_plan(profile: Profile, records: Dict[str, StepRecord], fail_step: Optional[str]) -> StepRecord:
    started = time.time()
    record = StepRecord()
    try:
        if fail_step == "memory_plan":
            raise DeliberateFailure("step memory_plan failed on purpose (--fail-step memory_plan)")
        step_memory_plan(profile, records, record)
    except Exception as exc:
        record.error("memory_plan", _exception_text(exc), traceback.format_exc())
        record.status = "failed"
    record.seconds = time.time() - started
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = DRY_PROFILE if args.dry else DEVICE_PROFILE
    if args.worker:
        return worker_main(args.worker, Path(args.results), args.budget_end, profile, args.fail_step,
                           args.stall_step)

    started = time.time()
    budget_end = started + args.budget_s
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("device_check: no CUDA device here (torch.cuda.is_available() is False); --dry runs every step on "
              "the CPU at tiny sizes.", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or "device_check_out")
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "mode": "dry" if args.dry else "device", "device": device_description(profile), "torch": torch.__version__,
        "cuda": torch.version.cuda, "flash_attn": _package_version("flash-attn"),
        "python": platform.python_version(), "commit": _commit(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": args.budget_s, "seconds": 0.0, "steps": {}, "failed": [],
    }
    print(f"device check ({report['mode']}) on {report['device']['name']}: torch {report['torch']}, "
          f"CUDA {report['cuda']}, budget {args.budget_s:.0f} s", flush=True)
    records: Dict[str, StepRecord] = {}

    def save(step: Optional[str] = None, record: Optional[StepRecord] = None):
        """Rewrite both files (after every step: a run cut short keeps what it measured)."""
        if step is not None:
            records[step] = record
            print(f"--- {step}: {record.status} ({record.seconds:.1f} s) ---", flush=True)
        # In the order of STEPS, whatever order they ended in.
        report["steps"] = {name: records[name].as_json() for name in STEPS if name in records}
        report["failed"] = [name for name in report["steps"] if records[name].status == "failed"]
        report["seconds"] = round(time.time() - started, 1)
        _write_atomically(out / JSON_NAME, json.dumps(report, indent=1, default=str))
        _write_atomically(out / TABLE_NAME, markdown(report))

    for step in STEPS:
        if step not in args.steps:
            records[step] = StepRecord(status="skipped", reason="not selected (--steps)")
    worker_steps = [step for step in STEPS if step in WORKER_STEPS and step in args.steps]
    with tempfile.TemporaryDirectory(prefix="device_check_") as scratch:
        run_workers(worker_steps, profile, args.dry, budget_end, args.fail_step, args.stall_step, Path(scratch),
                    save)
    if "memory_plan" in args.steps:
        left = budget_end - time.time()
        if left < profile.estimate_s["memory_plan"]:
            save("memory_plan", StepRecord(status="skipped", reason=f"budget: {max(left, 0):.0f} s left"))
        else:
            save("memory_plan", run_memory_plan(profile, records, args.fail_step))
    save()
    table = (out / TABLE_NAME).read_text()
    print("\n" + table, flush=True)
    print(f"device check: {report['seconds']:.0f} s; written {out / JSON_NAME} and {out / TABLE_NAME}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
