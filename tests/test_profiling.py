"""The --mm-tool JSON's `profile` and `memory_profile` sections (training/profiling.py): a profiled pretraining run
writes the trace of exactly the iterations asked for, and settings that cannot run are refused before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindspeed_mm.config import from_dict
from mindspeed_mm.config.tool import MMToolConfig
from mindspeed_mm.training.profiling import ProfilingConfigError, TrainingProfiler
from tests.helpers.training_fixtures import train_argv, write_training_configs

REPO = Path(__file__).resolve().parents[1]


def _tools(**sections) -> MMToolConfig:
    return from_dict(MMToolConfig, sections, source="tools.json")


def _run(argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(REPO / "pretrain_sora.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=600)


def test_pretraining_writes_the_trace_of_the_profiled_iterations(tmp_path):
    paths = write_training_configs(tmp_path / "w")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"profile": {"enable": True, "profile_type": "static", "ranks": [0], "static_param": {
        "start_step": 1, "end_step": 2, "record_shapes": True, "save_path": str(tmp_path / "prof")}}}))
    proc = _run(train_argv(paths, tmp_path / "save", iters=3, extra=["--mm-tool", str(tools)]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = list((tmp_path / "prof").glob("*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#1"]  # iteration 1 of this run, [start_step, end_step) = [1, 2)
    assert any(n.startswith("aten::") and "mm" in n for n in names)  # the DiT's matmuls were recorded
    assert any("Input Dims" in e.get("args", {}) for e in events)  # record_shapes


def test_profile_settings_that_cannot_run_are_refused():
    static = {"enable": True, "static_param": {"start_step": 2, "end_step": 2}}
    with pytest.raises(ProfilingConfigError, match=r"profile.static_param: start_step 2 and end_step 2"):
        TrainingProfiler.from_config(_tools(profile=static), 0, "cpu")
    for key, value, match in (("level", "level9", "level 'level9': one of level0, level1, level2"),
                              ("aic_metrics_type", "Memory", "aic_metrics_type 'Memory'")):
        cfg = {"enable": True, "static_param": {key: value}}
        with pytest.raises(ProfilingConfigError, match=match):
            TrainingProfiler.from_config(_tools(profile=cfg), 0, "cpu")
    dynamic = {"enable": True, "profile_type": "dynamic", "dynamic_param": {"config_path": "."}}
    with pytest.raises(ProfilingConfigError, match="dynamic profiler, which runs on NPUs only"):
        TrainingProfiler.from_config(_tools(profile=dynamic), 0, "cpu")
    with pytest.raises(ProfilingConfigError, match="memory_profile.enable: the allocator's memory history needs CUDA"):
        TrainingProfiler.from_config(_tools(memory_profile={"enable": True}), 0, "cpu")
    with pytest.raises(ProfilingConfigError, match="memory_profile.stacks 'some'"):
        TrainingProfiler.from_config(_tools(memory_profile={"enable": True, "stacks": "some"}), 0, "cpu")
    # Off (the shipped tools.json), or another rank than the ones asked for: nothing is built or recorded.
    assert TrainingProfiler.from_config(_tools(), 0, "cpu")._prof is None
    other = {"enable": True, "ranks": [1], "static_param": {"start_step": 0, "end_step": 1}}
    assert TrainingProfiler.from_config(_tools(profile=other), 0, "cpu")._prof is None
    assert TrainingProfiler.from_config(_tools(profile=dict(other, ranks=[-1])), 0, "cpu")._prof is not None


def test_a_bad_profile_setting_stops_pretraining_before_the_model_is_built(tmp_path):
    paths = write_training_configs(tmp_path / "w")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"memory_profile": {"enable": True}}))
    proc = _run(train_argv(paths, tmp_path / "save", iters=1, extra=["--mm-tool", str(tools)]))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith("error: --mm-tool memory_profile.enable"), proc.stderr[-2000:]
    assert "training:" not in proc.stdout and not (tmp_path / "save").exists()
