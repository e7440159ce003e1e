"""Training under TP x CP and DP x CP on gloo gives the single-process result.

Rank 0 first trains the same 2 iterations (global batch 2, 2 micro-batches, fp32) in a plain single
process; then all four ranks train with the layout under test, and the merged final weights are
compared. Noise and timesteps are seeded by the sample's position in the global batch, so every layout
draws the same ones (mindspeed_mm/training/train.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from tests.distributed.harness import REPO_ROOT, dist_case, pytest_cases


def _shared_tmp() -> Path:
    box = [tempfile.mkdtemp(prefix="mm_train_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _reference(root: Path, i2v: bool):
    """Configs on every rank's shared folder, and the single-process result (trained by rank 0)."""
    from tests.helpers.training_fixtures import train_argv, write_training_configs

    if dist.get_rank() == 0:
        paths = write_training_configs(root / "w", i2v=i2v)
        # A clean single-process environment: torchrun's variables (TORCHELASTIC_USE_AGENT_STORE above all)
        # would make the child join this job's rendezvous store and wait there forever.
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "pretrain_sora.py"),
                               *train_argv(paths, root / "reference", iters=2)],
                              capture_output=True, text=True, env=env, timeout=600)
        (root / "reference.done").write_text(str(proc.returncode))
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        # Wait without a collective: gloo's barrier keeps its ranks busy, starving rank 0's subprocess of CPU.
        deadline = time.time() + 600
        while not (root / "reference.done").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (root / "reference.done").read_text() == "0", "the single-process reference run failed on rank 0"
    dist.barrier()
    return {"data": root / "w" / "data.json", "model": root / "w" / "model.json"}


def _check_layout(tp: int, cp: int, i2v: bool):
    from mindspeed_mm.checkpoint.convert import read_megatron_full
    from mindspeed_mm.training import pretrain
    from tests.helpers.training_fixtures import train_argv

    root = _shared_tmp()
    paths = _reference(root, i2v)
    summary = pretrain(train_argv(paths, root / "parallel", iters=2, tp=tp, cp=cp,
                                  extra=["--use-distributed-optimizer"]))
    assert summary["iteration"] == 2
    dist.barrier()
    if dist.get_rank() == 0:
        want, _ = read_megatron_full(root / "reference", log=lambda m: None)
        got, info = read_megatron_full(root / "parallel", log=lambda m: None)
        assert info["tp"] == tp and set(got) == set(want)
        for key in want:
            scale = max(1.0, want[key].abs().max().item())
            diff = (got[key] - want[key]).abs().max().item()
            assert diff <= 2e-5 * scale, f"{key}: max |diff| {diff:.3e} after 2 steps (TP {tp}, CP {cp})"
    dist.barrier()


@dist_case(world_size=4)
def case_tp2_cp2_training_matches_single_process():
    _check_layout(tp=2, cp=2, i2v=False)


@dist_case(world_size=4)
def case_dp2_cp2_i2v_training_matches_single_process():
    _check_layout(tp=1, cp=2, i2v=True)


test_distributed = pytest_cases(globals())
