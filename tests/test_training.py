"""The training loop on one process: loss goes down, the seed's log parsing works, checkpoints resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_mm.checkpoint.megatron_layout import CHECKPOINT_FILENAME
from tests.helpers.training_fixtures import train_argv, write_training_configs

REPO = Path(__file__).resolve().parents[1]
# The seed's launcher reads the iteration time like this (pretrain_t2v.sh).
SEED_AWK = ("grep \"elapsed time per iteration\" {log} | awk -F ':' '{{print$5}}' | awk -F '|' '{{print$1}}' "
            "| head -n 200 | tail -n 100 | awk '{{sum+=$1}} END {{if (NR != 0) printf(\"%.1f\",sum/NR)}}'")


def _run(argv, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(REPO / "pretrain_sora.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)


def _model(save: Path, iteration: int) -> dict:
    return torch.load(save / f"iter_{iteration:07d}/mp_rank_00/{CHECKPOINT_FILENAME}", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    paths = write_training_configs(root / "w")
    proc = _run(train_argv(paths, root / "save", iters=4, extra=["--use-distributed-optimizer"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "train.log").write_text(proc.stdout)
    return root, paths, proc.stdout


def test_training_logs_checkpoints_and_learns(trained):
    root, _, stdout = trained
    lines = [line for line in stdout.splitlines() if "elapsed time per iteration" in line]
    assert len(lines) == 4 and "iteration        4/       4 | consumed samples:            8" in lines[-1]
    step_ms = subprocess.run(["bash", "-c", SEED_AWK.format(log=root / "train.log")], capture_output=True,
                             text=True).stdout
    assert float(step_ms) > 0
    metrics = [json.loads(line) for line in (root / "save" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    assert (root / "save" / "latest_checkpointed_iteration.txt").read_text() == "4"
    state = _model(root / "save", 4)
    assert state["iteration"] == 4 and state["consumed_samples"] == 8
    assert "transformer_blocks.0.attn1.proj_qkv.weight" in state["model"]  # MindSpeed-MM names, no prefix
    assert (root / "save" / "iter_0000004/mp_rank_00/distrib_optim.pt").is_file()
    assert not [p for p in (root / "save").iterdir() if p.name.startswith(".")]


def test_training_lowers_the_loss_at_fixed_t_and_noise(trained):
    """The logged losses draw new t and noise each step, so they cannot show learning (they fall at --lr 0 too).
    Evaluated at the same t and noise on every sample, the trained DiT beats the one it started from; at --lr 0
    the two are equal and this fails (checked by hand)."""
    from tests.helpers.training_eval import feature_samples, load_dit, mean_loss

    root, paths, _ = trained
    samples = feature_samples(paths)
    before = mean_loss(load_dit(paths["dit"]), samples)
    after = mean_loss(load_dit(root / "save"), samples)
    assert after < 0.99 * before, (before, after)


def test_resume_from_a_checkpoint_is_exact(trained, tmp_path):
    root, paths, _ = trained
    resume = tmp_path / "resume"
    shutil.copytree(root / "save" / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2")
    proc = _run(train_argv(paths, resume, iters=4, extra=["--use-distributed-optimizer", "--load", str(resume)]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at iteration 2 (4 samples consumed)" in proc.stdout
    want, got = _model(root / "save", 4)["model"], _model(resume, 4)["model"]
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _metrics(save: Path) -> dict:
    return {m["iteration"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("precision,distributed_optimizer", [("fp32", False), ("bf16", True), ("bf16", False)],
                         ids=["fp32", "bf16-distopt", "bf16"])
def test_resume_is_bitwise_in_each_precision_and_optimizer(trained, tmp_path, precision, distributed_optimizer):
    """fp32 with the distributed optimizer is the fixture's run (above); here the other three combinations. The
    resumed run's weights, losses and grad norms equal the uninterrupted run's, bit for bit."""
    _, paths, _ = trained
    extra = (["--bf16"] if precision == "bf16" else []) + (
        ["--use-distributed-optimizer"] if distributed_optimizer else [])
    full, resume = tmp_path / "full", tmp_path / "resume"
    proc = _run(train_argv(paths, full, iters=4, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(full / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2")
    proc = _run(train_argv(paths, resume, iters=4, extra=extra + ["--load", str(resume)]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _model(full, 4)["model"], _model(resume, 4)["model"]
    assert got["proj_out.weight"].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for it in (3, 4):
        a, b = _metrics(full)[it], _metrics(resume)[it]
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), (it, a, b)


def _step1_grad_norm(paths: dict, save: Path, extra) -> tuple:
    proc = _run(train_argv(paths, save, iters=1, extra=extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(save)[1], proc.stdout


def test_fp16_scales_the_loss_and_gets_the_fp32_gradients(trained, tmp_path):
    """--fp16 used to back-propagate the unscaled loss, so the optimizer's unscaling divided every gradient by the
    loss scale (grad norm 2^-12 of fp32's here). The step-1 grad norm must match fp32's within fp16 rounding, and
    the log line must show the scale in use."""
    _, paths, _ = trained
    fp32, _ = _step1_grad_norm(paths, tmp_path / "fp32", [])
    fp16, stdout = _step1_grad_norm(paths, tmp_path / "fp16", ["--fp16", "--initial-loss-scale", "4096"])
    assert fp16["loss_scale"] == 4096.0 and "| loss scale: 4096.0 |" in stdout
    assert abs(fp16["grad_norm"] / fp32["grad_norm"] - 1) < 0.02, (fp16["grad_norm"], fp32["grad_norm"])
    assert _model(tmp_path / "fp16", 1)["model"]["proj_out.weight"].dtype == torch.float16


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(trained, tmp_path):
    """Megatron's default initial scale 2^32 overflows fp16 gradients: the step is skipped (counted in the log)
    and, after --hysteresis overflows, the scale halves."""
    _, paths, _ = trained
    proc = _run(train_argv(paths, tmp_path / "save", iters=2, extra=["--fp16", "--hysteresis", "1"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _metrics(tmp_path / "save")
    assert metrics[1]["loss_scale"] == 2.0 ** 32 and metrics[2]["loss_scale"] == 2.0 ** 31
    assert "number of skipped iterations:   2" in proc.stdout


def test_release_checkpoint_starts_a_fresh_run_and_bad_load_fails(trained, tmp_path):
    root, paths, _ = trained
    from mindspeed_mm.checkpoint.convert import split

    split(paths["dit"], tmp_path / "converted", 1, [2], 2, log=lambda m: None)
    proc = _run(train_argv(paths, tmp_path / "save", iters=1, extra=["--load", str(tmp_path / "converted")]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting at iteration 0 with a fresh optimizer (a release checkpoint" in proc.stdout
    (tmp_path / "empty").mkdir()
    proc = _run(train_argv(paths, tmp_path / "save2", iters=1, extra=["--load", str(tmp_path / "empty")]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: StepVideo DiT: '" in proc.stderr and "We never start from random weights silently" in proc.stderr


def test_i2v_pretrain_launcher_in_bf16_with_recompute(tmp_path):
    """The seed's i2v launcher (bf16, distributed optimizer, recompute 48 layers) on a tiny converted checkpoint."""
    import socket

    from mindspeed_mm.checkpoint.convert import split

    paths = write_training_configs(tmp_path / "w", i2v=True)
    split(paths["dit"], tmp_path / "converted", 1, [2], 2, log=lambda m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NPUS_PER_NODE="1", TP="1", CP="1", MM_DATA=str(paths["data"]),
               MM_MODEL=str(paths["model"]), LOAD_PATH=str(tmp_path / "converted"), SAVE_PATH=str(tmp_path / "save"),
               TRAIN_ITERS="2", LOG_DIR=str(tmp_path / "logs"), MASTER_PORT=str(port), NUM_WORKERS="0",
               MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", "examples/stepvideo/i2v/pretrain_i2v.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "loading the DiT from" in out and "iteration        2/       2" in out
    assert "Average Samples per Second:" in out  # the seed's throughput line, parsed from our log lines
    state = _model(tmp_path / "save", 2)
    assert state["model"]["proj_out.weight"].dtype == torch.bfloat16


def test_unreadable_rows_are_replaced_and_reported_once(tmp_path):
    """A damaged feature file is skipped, replaced by the next readable row and reported by rank 0 with its line
    and reason (the counts used to stay inside the dataset object, never printed)."""
    paths = write_training_configs(tmp_path / "w")
    bad = tmp_path / "w" / "features_data" / "features" / "s1.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    proc = _run(train_argv(paths, tmp_path / "save", iters=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = [line for line in proc.stdout.splitlines() if line.startswith("data: ")]
    assert report == ["data: 1 row skipped and replaced by the next readable row: 1 unreadable .pt (line 2)"], \
        proc.stdout[-2000:]
    assert "kept 8 of 8 rows in data.jsonl" in proc.stdout  # the manifest summary, now that logging is configured


def test_torch_dist_checkpoints_resume_and_convert_like_the_legacy_format(trained, tmp_path):
    """--ckpt-format torch_dist: the same run saved in both formats holds the same weights; the converter merges a
    torch_dist training checkpoint into the release layout (--mode merge) and exports it (--mode export)."""
    from mindspeed_mm.checkpoint.megatron_source import read_megatron_full

    root, paths, _ = trained
    save = tmp_path / "dist"
    proc = _run(train_argv(paths, save, iters=4, extra=["--use-distributed-optimizer", "--ckpt-format",
                                                        "torch_dist"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (save / "iter_0000004" / "metadata.json").is_file() and not list(save.glob("iter_*/mp_rank_*"))
    legacy = _model(root / "save", 4)["model"]
    for key, value in read_megatron_full(save, log=lambda m: None)[0].items():
        assert torch.equal(value, legacy[key]), key
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    convert = [sys.executable, str(REPO / "examples/stepvideo/convert_ckpt_to_mm.py"), "--source_path", str(save),
               "--num_layers", "2"]
    proc = subprocess.run(convert + ["--target_path", str(tmp_path / "merged"), "--tp_size", "2", "--mode", "merge"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, info = read_megatron_full(tmp_path / "merged", log=lambda m: None)
    assert info["tp"] == 2 and all(torch.equal(merged[k], legacy[k]) for k in legacy)
    proc = subprocess.run(convert + ["--target_path", str(tmp_path / "exported"), "--mode", "export"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "exported" / "diffusion_pytorch_model.safetensors").is_file()


def test_async_save_writes_the_same_checkpoints_in_the_background(trained, tmp_path):
    """--async-save (torch_dist): the writes run in background processes, the renames and the tracker follow when
    the save completes; the checkpoints hold what a synchronous run saves."""
    from mindspeed_mm.checkpoint.megatron_source import read_megatron_full

    root, paths, _ = trained
    save = tmp_path / "async"
    proc = _run(train_argv(paths, save, iters=4, extra=["--use-distributed-optimizer", "--ckpt-format",
                                                        "torch_dist", "--async-save"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved checkpoint of iteration 2" in proc.stdout and "saved checkpoint of iteration 4" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not [p for p in save.iterdir() if p.name.startswith(".")]
    legacy = _model(root / "save", 4)["model"]
    for key, value in read_megatron_full(save, log=lambda m: None)[0].items():
        assert torch.equal(value, legacy[key]), key
    proc = _run(train_argv(paths, tmp_path / "x", iters=1, extra=["--async-save"]))
    assert proc.returncode == 2 and "--async-save writes distributed checkpoints" in proc.stderr
