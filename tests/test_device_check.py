"""benchmarks/device_check.sh end to end on the CPU (--dry): every step runs through the same driver, worker
processes and report as on the GPU, at tiny sizes; and a failing step, a step past its time limit and the budget
are recorded as such while the check goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GIB = 2 ** 30

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
STEPS = ["tests", "golden", "dit_train", "sampling", "vae", "memory_plan"]


def _run(out: Path, *options: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry", "--out", str(out), *options], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _figures(step: dict) -> dict:
    return {(f["item"], f["figure"]): f for f in step["figures"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "out"
    done = _run(out)
    return done, json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text()


def test_dry_run_passes_every_step(dry_run):
    done, report, _ = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert list(report["steps"]) == STEPS and report["failed"] == []
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step)
        assert step["errors"] == [] and step["skipped"] == [], (name, step)
        assert step["figures"], name
    assert report["mode"] == "dry" and report["device"]["type"] == "cpu"
    assert report["torch"] and "cuda" in report and report["budget_s"] == 450


def test_dry_run_figures(dry_run):
    _, report, _ = dry_run
    steps = report["steps"]
    tests = _figures(steps["tests"])
    assert tests[("pytest, MINDSPEED_MM_DEVICE=cpu", "tests passed")]["value"] == 9
    assert tests[("pytest, MINDSPEED_MM_DEVICE=cpu", "tests failed")]["value"] == 0

    golden = _figures(steps["golden"])
    for case in ("dit_t2v", "dit_ti2v"):
        assert golden[(f"{case} fp32 sdpa, TF32 off", "max |error| vs golden")]["value"] < 1e-4
        bf16 = golden[(f"{case} bf16 sdpa", "max |error| vs golden")]
        assert 1e-3 < bf16["value"] < 0.15 and bf16["note"].startswith("within")
        # The flash backend needs CUDA: recorded as unavailable, with the reason, not as an error.
        flash = golden[(f"{case} bf16 flash", "max |error| vs golden")]
        assert flash["value"] is None and flash["note"] == "unavailable: flash-attn needs CUDA"

    train = _figures(steps["dit_train"])
    for tokens, size in (("288", "3x8x12"), ("576", "6x8x12")):
        for recompute in ("none", "block"):
            item = f"train, {tokens} tokens ({size}), recompute {recompute}"
            assert train[(item, "throughput")]["value"] > 0 and train[(item, "step time")]["unit"] == "ms"
            assert train[(item, "MFU")]["value"] is None  # CUDA only
            details = steps["dit_train"]["details"][item]
            assert details["tokens"] == int(tokens)
            assert details["recompute_layers"] == (2 if recompute == "block" else 0)  # both blocks, or none
            assert details["drop_grads"] and details["attention_backend"] == "sdpa"

    sampling = _figures(steps["sampling"])
    item = "sampling step, 576 tokens (6x8x12), CFG batch 2"
    assert steps["sampling"]["details"][item]["batch"] == 2
    forward_ms = sampling[(item, "forward, 2 blocks")]["value"]
    full_s = sampling[(item, "one step at 48 blocks (extrapolated)")]["value"]
    assert 20 * forward_ms / 1e3 < full_s < 26 * forward_ms / 1e3  # about 48 / 2 blocks by the FLOP count
    offloaded = "sampling step, dit_layerwise_offload, 576 tokens (6x8x12), 4 blocks"
    details = steps["sampling"]["details"][offloaded]
    assert details["offload"] and details["layers"] == 4 and details["batch"] == 2
    assert sampling[(offloaded, "time per block, offloaded / resident")]["value"] > 0
    assert sampling[(offloaded, "copied per forward")]["value"] * GIB == 4 * details["block_bytes"]

    vae = _figures(steps["vae"])
    for mode in ("untiled", "tiled 32/16 px"):
        assert vae[(f"VAE 17x32x48 {mode}", "decode time")]["value"] > 0
        assert vae[(f"VAE 17x32x48 {mode}", "decode peak memory")]["unit"] == "GiB"

    plan = _figures(steps["memory_plan"])
    ratios = {item: fig for (item, name), fig in plan.items() if name == "measured / planner"}
    assert len(ratios) == 4 + 3 + 2  # DiT training steps, sampling forwards (one offloaded), VAE encodes
    assert all("not comparable" in fig["note"] for fig in ratios.values())
    # On the CPU the memory figures come from the process's peak RSS, a high-water mark: a later, smaller run can
    # show no growth at all. The first DiT step cannot.
    assert all(fig["value"] >= 0 for fig in ratios.values())
    assert ratios["DiT activations: train, 288 tokens (3x8x12), recompute none"]["value"] > 0
    predicted = plan[("DiT activations: train, 576 tokens (6x8x12), recompute none", "planner")]["value"]
    assert predicted > plan[("DiT activations: train, 288 tokens (3x8x12), recompute none", "planner")]["value"]


def test_table_names_the_device_and_has_a_row_per_figure(dry_run):
    done, report, table = dry_run
    name = report["device"]["name"]
    assert name.startswith("CPU (") and f"# Device check: {name}" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    figures = sum(len(step["figures"]) for step in report["steps"].values())
    assert len(rows) == 2 + len(STEPS) + figures  # two header rows, a row per step, a row per figure
    assert "| golden | dit_t2v bf16 flash | max \\|error\\| vs golden | n/a | unavailable: flash-attn needs CUDA |" \
        in table
    assert table in done.stdout  # printed at the end


def test_a_failing_step_a_killed_step_and_the_budget_are_recorded(tmp_path):
    # tests fails on purpose in its own process; sampling hangs until the budget's end kills it; the check goes
    # on: vae and memory_plan are then skipped for the budget, and the exit status says a step failed.
    out = tmp_path / "out"
    done = _run(out, "--steps", "tests,sampling,vae,memory_plan", "--fail-step", "tests", "--stall-step", "sampling",
                "--budget-s", "10", timeout=60)
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads((out / "device_check.json").read_text())
    steps = report["steps"]
    assert report["failed"] == ["tests", "sampling"]
    assert steps["tests"]["status"] == "failed"
    assert steps["tests"]["errors"][0]["error"] == "DeliberateFailure: step tests failed on purpose (--fail-step tests)"
    assert steps["sampling"]["status"] == "failed"
    assert steps["sampling"]["errors"][0]["error"].startswith("killed at its time limit")
    assert 3 < steps["sampling"]["seconds"] < 10
    assert (steps["golden"]["status"], steps["golden"]["reason"]) == ("skipped", "not selected (--steps)")
    for name in ("vae", "memory_plan"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith("budget: "), steps[name]
    table = (out / "device_check.md").read_text()
    assert "| tests | failed |" in table and "| sampling | failed |" in table and "| vae | skipped |" in table
