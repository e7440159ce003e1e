"""benchmarks/dit_step.py runs end to end at a tiny size (no assertion on time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mindspeed_mm.config.model import PredictorConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dit_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("dit_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_and_reports(capsys):
    _module().main(["--layers", "1", "--heads", "2", "--head-dim", "16", "--frames", "2", "--height", "2",
                    "--width", "2", "--caption-channels", "16", "8", "--llm-len", "4", "--clip-len", "2",
                    "--in-channels", "4", "--dtype", "fp32", "--device", "cpu", "--steps", "1", "--warmup", "0",
                    "--i2v", "--recompute", "block"])
    out = capsys.readouterr().out
    assert "latents 1x2x2x2 = 8 tokens" in out
    assert "forward: " in out and "forward+backward: " in out and "tokens/s" in out and "peak memory" in out


def test_flop_count_at_real_width():
    cfg = PredictorConfig(num_layers=1)
    d, s, kv = 6144, 24 * 34 * 62, 397
    block = 28 * s * d * d + 4 * kv * d * d + 4 * s * s * d + 4 * s * kv * d
    flops = _module().forward_flops(cfg, 1, s, kv, 320)
    assert block < flops < 1.01 * block  # the blocks dominate; the rest is under 1%
