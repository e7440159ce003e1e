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
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (root / "save" / "latest_checkpointed_iteration.txt").read_text() == "4"
    state = _model(root / "save", 4)
    assert state["iteration"] == 4 and state["consumed_samples"] == 8
    assert "transformer_blocks.0.attn1.proj_qkv.weight" in state["model"]  # MindSpeed-MM names, no prefix
    assert (root / "save" / "iter_0000004/mp_rank_00/distrib_optim.pt").is_file()
    assert not [p for p in (root / "save").iterdir() if p.name.startswith(".")]


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
