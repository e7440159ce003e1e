"""Distributed checkpoints (`--ckpt-format torch_dist`) reshard: saved at TP=2 x DP=2, resumed at other layouts.

One uninterrupted run at TP=2 x DP=2 with the distributed optimizer trains 4 iterations (global batch 4) and saves
at 2 and 4. Its iteration-2 checkpoint is then resumed at TP=1 x DP=4 and at TP=2 x CP=2 (data parallel 1), and the
next two steps must match the uninterrupted ones: loss and grad norm at each step and the final weights. Other
layouts sum in another order, so the match is within float32 rounding (1e-5 relative), not bitwise; a resume that
lost the optimizer state (Adam's moments) is far outside it, which the control resume with --no-load-optim shows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

ITERS, GBS = 4, 4


def _shared_tmp() -> Path:
    box = [tempfile.mkdtemp(prefix="mm_distckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _metrics(save: Path) -> dict:
    return {m["iteration"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


def _argv(paths, save: Path, tp: int, cp: int, extra=()):
    from tests.helpers.training_fixtures import train_argv

    return train_argv(paths, save, iters=ITERS, gbs=GBS, tp=tp, cp=cp,
                      extra=["--use-distributed-optimizer", "--ckpt-format", "torch_dist", *extra])


def _resume(root: Path, paths, name: str, tp: int, cp: int, extra=()) -> Path:
    from mindspeed_mm.training import pretrain

    save = root / name
    if dist.get_rank() == 0:
        shutil.copytree(root / "full" / "iter_0000002", save / "iter_0000002")
        (save / "latest_checkpointed_iteration.txt").write_text("2")
    dist.barrier()
    summary = pretrain(_argv(paths, save, tp, cp, extra=["--load", str(save), *extra]))
    assert summary["iteration"] == ITERS and summary["consumed_samples"] == ITERS * GBS
    return save


def _largest_weight_difference(a: Path, b: Path) -> float:
    from mindspeed_mm.checkpoint.megatron_source import read_megatron_full

    want, info_a = read_megatron_full(a, log=lambda m: None)
    got, _ = read_megatron_full(b, log=lambda m: None)
    assert set(got) == set(want) and info_a["iteration"] == ITERS
    return max(((got[k] - want[k]).abs().max() / max(1.0, want[k].abs().max().item())).item() for k in want)


@dist_case(world_size=4)
def case_torch_dist_saved_at_tp2_dp2_resumes_at_tp1_dp4_and_tp2_dp1():
    from mindspeed_mm.training import pretrain
    from tests.helpers.training_fixtures import write_training_configs

    root = _shared_tmp()
    if dist.get_rank() == 0:
        write_training_configs(root / "w", samples=ITERS * GBS)
    dist.barrier()
    paths = {"data": root / "w" / "data.json", "model": root / "w" / "model.json"}
    assert pretrain(_argv(paths, root / "full", tp=2, cp=1))["iteration"] == ITERS
    resumed = {"TP=1 x DP=4": _resume(root, paths, "tp1_dp4", tp=1, cp=1),
               "TP=2 x CP=2 x DP=1": _resume(root, paths, "tp2_cp2", tp=2, cp=2)}
    control = _resume(root, paths, "no_optimizer_state", tp=1, cp=1, extra=["--no-load-optim"])
    # Every rank checks (reading a distributed checkpoint is collective).
    full = _metrics(root / "full")
    for layout, save in resumed.items():
        for it in (3, 4):
            got = _metrics(save)[it]
            for key in ("loss", "grad_norm"):
                assert abs(got[key] - full[it][key]) <= 1e-5 * abs(full[it][key]), (layout, it, key, got, full[it])
        diff = _largest_weight_difference(root / "full", save)
        assert diff <= 2e-5, f"{layout}: weights after 4 steps differ by {diff:.2e} (relative)"
    diff = _largest_weight_difference(root / "full", control)
    assert diff > 1e-3, f"a resume without the optimizer state differs by only {diff:.2e}: the test cannot see it"
    dist.barrier()


test_distributed = pytest_cases(globals())
