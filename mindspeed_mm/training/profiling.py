"""The `--mm-tool` JSON's `profile` and `memory_profile` sections around the training loop (MindSpeed-MM's keys).

    profiler = TrainingProfiler.from_config(args.mm.tool, rank, device)
    while training:
        ... one iteration ...
        profiler.step()
    profiler.close()

`profile` (static): iterations [start_step, end_step) of this run, counted from its first iteration (also after a
resume), are profiled on the global ranks `ranks` ([-1]: all) and written by the profiler's TensorBoard trace
handler to `save_path` (one trace file per rank, viewable in TensorBoard's profiler or chrome://tracing). On NPUs
`torch_npu.profiler` with `level`, `aic_metrics_type` and `data_simplification`; elsewhere `torch.profiler`, where
those three are NPU settings and have no effect. `with_cpu` adds host activity next to the device's (on a CPU-only
machine the host is the device). `profile_type` "dynamic" hands `dynamic_param.config_path` to torch_npu's dynamic
profiler, which exists only on NPUs.

`memory_profile`: the accelerator allocator's history is recorded from iteration `start_step` and dumped at
`end_step` to `save_path/memory_snapshot_rank{R}_iter{I}.pickle` on `dump_ranks` (view it at
https://pytorch.org/memory_viz); `stacks` "all" or "python", `max_entries` the history length. It needs CUDA or
an NPU build with the same API: the CPU allocator keeps no history.

Every setting is checked when the profiler is built, before the first iteration.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch

from ..errors import MindSpeedMMError

logger = logging.getLogger("mindspeed_mm.training")

LEVELS = ("level0", "level1", "level2")
AIC_METRICS = ("PipeUtilization", "ArithmeticUtilization")


class ProfilingConfigError(MindSpeedMMError, ValueError):
    """A `profile` / `memory_profile` setting that cannot run; names the key of the --mm-tool JSON."""


def _selected(ranks: List[int], rank: int) -> bool:
    return list(ranks) == [-1] or rank in ranks


def _check_steps(section: str, start: int, end: int) -> None:
    if start < 0 or end <= start:
        raise ProfilingConfigError(f"--mm-tool {section}: start_step {start} and end_step {end} must satisfy "
                                   f"0 <= start_step < end_step (iterations [start_step, end_step) are recorded).")


class TrainingProfiler:
    def __init__(self, profile=None, memory=None, rank: int = 0, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.steps = 0  # iterations finished in this run
        self._prof = None
        self._started = False
        self._dynamic = None
        self._memory = None
        self.rank = rank
        if profile is not None and profile.enable:
            self._build_profile(profile)
        if memory is not None and memory.enable:
            self._build_memory(memory)

    @classmethod
    def from_config(cls, tool, rank: int, device) -> "TrainingProfiler":
        """From args.mm.tool (None without --mm-tool: nothing is recorded)."""
        if tool is None:
            return cls(rank=rank, device=device)
        return cls(tool.profile, tool.memory_profile, rank, device)

    # ---- profile -------------------------------------------------------------------------------------

    def _build_profile(self, cfg) -> None:
        npu = self.device.type == "npu"
        if cfg.profile_type == "dynamic":
            if not npu:
                raise ProfilingConfigError(
                    "--mm-tool profile.profile_type \"dynamic\" uses torch_npu's dynamic profiler, which runs on NPUs "
                    f"only (this run is on {self.device.type}); use \"static\" with static_param.start_step/end_step.")
            if not os.path.isdir(cfg.dynamic_param.config_path):
                raise ProfilingConfigError(f"--mm-tool profile.dynamic_param.config_path "
                                           f"'{cfg.dynamic_param.config_path}' is not a folder; point it at the "
                                           f"folder of the dynamic profiler's profiler_config.json.")
            if _selected(cfg.ranks, self.rank):
                from torch_npu.profiler import dynamic_profile

                dynamic_profile.init(cfg.dynamic_param.config_path)
                self._dynamic = dynamic_profile
            return
        p = cfg.static_param
        _check_steps("profile.static_param", p.start_step, p.end_step)
        if p.level not in LEVELS:
            raise ProfilingConfigError(f"--mm-tool profile.static_param.level {p.level!r}: one of {', '.join(LEVELS)}.")
        if p.aic_metrics_type not in AIC_METRICS:
            raise ProfilingConfigError(f"--mm-tool profile.static_param.aic_metrics_type {p.aic_metrics_type!r}: one "
                                       f"of {', '.join(AIC_METRICS)}.")
        if not _selected(cfg.ranks, self.rank):
            return
        # One warm-up iteration before the window when there is one (the profiler's first moments are slow)
        warmup = 1 if p.start_step >= 1 else 0
        schedule = dict(wait=0, warmup=warmup, active=p.end_step - p.start_step, repeat=1,
                        skip_first=p.start_step - warmup)
        options = dict(record_shapes=p.record_shapes, profile_memory=p.with_memory, with_stack=p.with_stack)
        if npu:
            import torch_npu

            prof = torch_npu.profiler
            activities = [prof.ProfilerActivity.NPU] + ([prof.ProfilerActivity.CPU] if p.with_cpu else [])
            options["experimental_config"] = prof._ExperimentalConfig(
                profiler_level=getattr(prof.ProfilerLevel, p.level.capitalize()),
                aic_metrics=getattr(prof.AiCMetrics, p.aic_metrics_type),
                data_simplification=p.data_simplification)
        else:
            prof = torch.profiler
            activities = [prof.ProfilerActivity.CPU] if p.with_cpu or self.device.type == "cpu" else []
            if self.device.type == "cuda":
                activities.append(prof.ProfilerActivity.CUDA)
        os.makedirs(p.save_path, exist_ok=True)
        # started at the first iteration: setup before it is never recorded, also with start_step 0
        self._prof = prof.profile(activities=activities, schedule=prof.schedule(**schedule),
                                  on_trace_ready=prof.tensorboard_trace_handler(p.save_path), **options)
        logger.info("profiling iterations [%d, %d) of this run into %s", p.start_step, p.end_step, p.save_path)

    # ---- memory_profile ------------------------------------------------------------------------------

    def _build_memory(self, cfg) -> None:
        _check_steps("memory_profile", cfg.start_step, cfg.end_step)
        if cfg.stacks not in ("all", "python"):
            raise ProfilingConfigError(f"--mm-tool memory_profile.stacks {cfg.stacks!r}: \"all\" or \"python\".")
        if cfg.max_entries is not None and cfg.max_entries < 1:
            raise ProfilingConfigError(f"--mm-tool memory_profile.max_entries {cfg.max_entries} must be at least 1 "
                                       f"(or null for the allocator's default).")
        module = getattr(torch, self.device.type, None)
        memory = getattr(module, "memory", None) if self.device.type in ("cuda", "npu") else None
        if memory is None or not hasattr(memory, "_record_memory_history"):
            raise ProfilingConfigError(
                f"--mm-tool memory_profile.enable: the allocator's memory history needs CUDA (or an NPU build with "
                f"it); this run is on {self.device.type}. Set it false here.")
        if _selected(cfg.dump_ranks, self.rank):
            self._memory = (cfg, memory)

    # ---- the loop ------------------------------------------------------------------------------------

    def _memory_start(self) -> None:
        cfg, memory = self._memory
        kwargs = {"stacks": cfg.stacks}
        if cfg.max_entries is not None:
            kwargs["max_entries"] = cfg.max_entries
        memory._record_memory_history(**kwargs)

    def _memory_dump(self) -> None:
        cfg, memory = self._memory
        os.makedirs(cfg.save_path, exist_ok=True)
        path = os.path.join(cfg.save_path, f"memory_snapshot_rank{self.rank}_iter{self.steps}.pickle")
        memory._dump_snapshot(path)
        memory._record_memory_history(enabled=None)
        logger.info("memory snapshot of iterations [%d, %d) written to %s", cfg.start_step, cfg.end_step, path)

    def start_iteration(self) -> None:
        """Call before each iteration (the memory history starts at iteration start_step)."""
        if self._prof is not None and not self._started:
            self._prof.start()
            self._started = True
        if self._memory is not None and self.steps == self._memory[0].start_step:
            self._memory_start()

    def step(self) -> None:
        """Call after each iteration."""
        self.steps += 1
        if self._prof is not None:
            self._prof.step()
        if self._dynamic is not None:
            self._dynamic.step()
        if self._memory is not None and self.steps == self._memory[0].end_step:
            self._memory_dump()

    def close(self) -> None:
        if self._prof is not None and self._started:
            self._prof.stop()
        self._prof = None
