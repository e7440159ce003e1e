"""Training under TP x CP and DP x CP (Ulysses, ring, hybrid, sequence parallel, overlapped DDP) on gloo gives
the single-process result.

Rank 0 first trains the same 2 iterations (global batch 2, 2 micro-batches, fp32) in a plain single
process; then all four ranks train with the layout under test, and the logged loss and grad norm of each
step and the merged final weights are compared. The grad norm is what sees a gradient-scale error: AdamW
normalises the update, so weights after clipped AdamW steps barely move when every gradient is scaled by 4.
Noise and timesteps are seeded by the sample's position in the global batch, so every layout draws the same
ones (mindspeed_mm/training/train.py). DP=2 resume is checked against the same run uninterrupted.
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


def _reference(root: Path, i2v: bool, gbs: int = 2, extra=(), dpo: bool = False):
    """Configs on every rank's shared folder, and the single-process result (trained by rank 0)."""
    from tests.helpers.training_fixtures import train_argv, write_dpo_configs, write_training_configs

    if dist.get_rank() == 0:
        paths = write_dpo_configs(root, i2v=i2v) if dpo else write_training_configs(root / "w", i2v=i2v)
        # A clean single-process environment: torchrun's variables (TORCHELASTIC_USE_AGENT_STORE above all)
        # would make the child join this job's rendezvous store and wait there forever.
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC")}
        script = "posttrain_sora_dpo.py" if dpo else "pretrain_sora.py"
        proc = subprocess.run([sys.executable, str(REPO_ROOT / script),
                               *train_argv(paths, root / "reference", iters=2, gbs=gbs, extra=list(extra))],
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


def _check_layout(tp: int, cp: int, i2v: bool, extra=(), gbs: int = 2, task=(), dpo: bool = False):
    from mindspeed_mm.checkpoint.megatron_source import read_megatron_full
    from mindspeed_mm.training import pretrain
    from mindspeed_mm.training.spec import DPO, PRETRAIN
    from tests.helpers.training_fixtures import changed_base_parameters, frozen_base_spec, train_argv

    root = _shared_tmp()
    paths = _reference(root, i2v, gbs, task, dpo=dpo)
    spec, box = frozen_base_spec(DPO if dpo else PRETRAIN)
    summary = pretrain(train_argv(paths, root / "parallel", iters=2, tp=tp, cp=cp, gbs=gbs,
                                  extra=["--use-distributed-optimizer", *task, *extra]), spec)
    assert summary["iteration"] == 2
    if "--lora-target-modules" in task:  # LoRA: the frozen base is bitwise what was loaded, on every rank
        assert not changed_base_parameters(box), changed_base_parameters(box)[:5]
    dist.barrier()
    if dist.get_rank() == 0:
        want_log, got_log = _metrics(root / "reference"), _metrics(root / "parallel")
        # DPO's loss scales the per-pair MSE differences by loss_beta x 1000 x (1 - t): float reordering under CP
        # shows at 1e-5 there; a wrong reference or gradient moves it by far more (log 2 at step 1, margins after).
        rtol = 1e-4 if dpo else 1e-5
        for it in (1, 2):
            for key in ("loss", "grad_norm"):
                a, b = want_log[it][key], got_log[it][key]
                assert abs(b - a) <= rtol * abs(a), f"step {it} {key}: {b} vs one process {a} (TP {tp}, CP {cp})"
        want, _ = read_megatron_full(root / "reference", log=lambda m: None)
        got, info = read_megatron_full(root / "parallel", log=lambda m: None)
        assert info["tp"] == tp and set(got) == set(want)
        for key in want:
            scale = max(1.0, want[key].abs().max().item())
            diff = (got[key] - want[key]).abs().max().item()
            # (DPO: Adam divides the amplified differences by tiny second moments; the grad norm above is the check)
            bound = (1e-4 if dpo else 2e-5) * scale
            assert diff <= bound, f"{key}: max |diff| {diff:.3e} after 2 steps (TP {tp}, CP {cp})"
    dist.barrier()


def _metrics(save: Path) -> dict:
    import json

    return {m["iteration"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


def _check_dp2_resume(extra):
    import shutil

    import torch

    from mindspeed_mm.training import pretrain
    from tests.helpers.training_fixtures import train_argv, write_training_configs

    root = _shared_tmp()
    if dist.get_rank() == 0:
        write_training_configs(root / "w")
    dist.barrier()
    paths = {"data": root / "w" / "data.json", "model": root / "w" / "model.json"}
    assert pretrain(train_argv(paths, root / "full", iters=4, extra=extra))["iteration"] == 4
    if dist.get_rank() == 0:
        shutil.copytree(root / "full" / "iter_0000002", root / "resume" / "iter_0000002")
        (root / "resume" / "latest_checkpointed_iteration.txt").write_text("2")
    dist.barrier()
    summary = pretrain(train_argv(paths, root / "resume", iters=4, extra=extra + ["--load", str(root / "resume")]))
    assert summary["iteration"] == 4 and summary["consumed_samples"] == 8
    if dist.get_rank() == 0:
        for it in (3, 4):
            a, b = _metrics(root / "full")[it], _metrics(root / "resume")[it]
            assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), (it, a, b)
        name = "iter_0000004/mp_rank_00/model_optim_rng.pt"
        want = torch.load(root / "full" / name, weights_only=False)["model"]
        got = torch.load(root / "resume" / name, weights_only=False)["model"]
        for key in want:
            assert torch.equal(got[key], want[key]), key
    dist.barrier()


@dist_case(world_size=2)
def case_dp2_resume_is_bitwise_with_the_distributed_optimizer():
    _check_dp2_resume(["--use-distributed-optimizer"])


@dist_case(world_size=2)
def case_dp2_resume_is_bitwise_in_bf16():
    _check_dp2_resume(["--bf16"])


@dist_case(world_size=4)
def case_tp2_cp2_training_matches_single_process():
    _check_layout(tp=2, cp=2, i2v=False)


@dist_case(world_size=4)
def case_dp2_cp2_i2v_training_matches_single_process():
    _check_layout(tp=1, cp=2, i2v=True)


@dist_case(world_size=2)
def case_dp2_overlapped_grad_reduce_and_param_gather_match_single_process():
    # Two micro-batches per rank: the first backward runs under no_sync, the second reduces while it runs; the
    # parameters updated by step 1 are gathered during step 2's forward, and before the save at step 2.
    _check_layout(tp=1, cp=1, i2v=False, gbs=4, extra=["--overlap-grad-reduce", "--overlap-param-gather"])


@dist_case(world_size=2)
def case_tp2_sp_lora_training_matches_single_process():
    # Only the adapters train (the merged checkpoint holds them alone); TP-split B / A rows and columns merge back.
    _check_layout(tp=2, cp=1, i2v=False, extra=["--sequence-parallel"],
                  task=["--lora-target-modules", "attn1.proj_qkv", "attn1.proj_out", "attn2.proj_kv", "ff.net.0.proj",
                        "ff.net.2", "--lora-r", "4", "--lora-alpha", "8"])


@dist_case(world_size=2)
def case_cp2_lora_dpo_i2v_with_recompute_matches_single_process():
    # LoRA-DPO: one DiT, the reference its base with the adapters off, under Ulysses CP2 and full recompute (the
    # recomputed actor blocks run after the reference pass, with the adapters on again).
    _check_layout(tp=1, cp=2, i2v=True, dpo=True, extra=["--recompute-granularity", "full", "--recompute-method",
                                                         "block", "--recompute-num-layers", "2"],
                  task=["--dpo-beta", "0.1", "--lora-target-modules", "attn1.proj_qkv", "attn2.proj_q", "ff.net.2",
                        "--lora-r", "4", "--lora-alpha", "8"])


@dist_case(world_size=4)
def case_tp2_sp_ring_cp2_training_matches_single_process():
    _check_layout(tp=2, cp=2, i2v=False, extra=["--sequence-parallel", "--context-parallel-algo", "megatron_cp_algo",
                                                "--recompute-granularity", "full", "--recompute-method", "block",
                                                "--recompute-num-layers", "1"])


@dist_case(world_size=4)
def case_hybrid_cp4_i2v_training_matches_single_process():
    _check_layout(tp=1, cp=4, i2v=True, extra=["--context-parallel-algo", "hybrid_cp_algo",
                                               "--ulysses-degree-in-cp", "2"])


test_distributed = pytest_cases(globals())
