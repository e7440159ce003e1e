"""LoRA pretraining through the real entry point: only the adapters train and are saved (with a record of the base),
the run resumes exactly from --lora-load, and bad LoRA flags fail before anything is built."""

from __future__ import annotations

import json

import pytest
import torch

from mindspeed_mm.arguments import ArgumentError, parse_args
from mindspeed_mm.training import pretrain
from mindspeed_mm.training.spec import PRETRAIN
from tests.helpers.training_fixtures import (changed_base_parameters, frozen_base_spec, train_argv,
                                             write_training_configs)

LORA = ["--lora-target-modules", "attn1.proj_qkv", "attn1.proj_out", "attn2.proj_kv", "ff.net.2",
        "--lora-r", "4", "--lora-alpha", "8"]


def _metrics(save):
    return {m["iteration"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


def _payload(save, iteration):
    return torch.load(save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    paths = write_training_configs(root / "w")
    spec, box = frozen_base_spec(PRETRAIN)
    pretrain(train_argv(paths, root / "full", iters=4, extra=LORA), spec)
    assert box["base"] and not changed_base_parameters(box)  # the base is bitwise untouched after 4 steps
    pretrain(train_argv(paths, root / "first", iters=2, extra=LORA))
    pretrain(train_argv(paths, root / "resumed", iters=4, extra=LORA + ["--lora-load", str(root / "first")]))
    return root, paths


def test_only_the_adapters_train_and_are_saved(runs):
    root, paths = runs
    payload = _payload(root / "full", 4)
    keys = set(payload["model"])
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys), sorted(keys)[:5]
    assert any(".attn1.proj_qkv.lora_B" in k for k in keys) and not any("attn2.proj_q.lora" in k for k in keys)
    # The adapters moved from B = 0 (the base is what --load / from_pretrained names: it is not saved).
    assert any(v.abs().max() > 0 for k, v in payload["model"].items() if k.endswith("lora_B"))
    # The optimizer holds the adapters only: no Adam moments for the 30B base.
    moments = payload["optimizer"]["state"]
    sizes = sorted(s["exp_avg"].numel() for s in moments.values())
    assert sizes == sorted(v.numel() for v in payload["model"].values())
    record = json.loads((root / "full" / "iter_0000004" / "lora.json").read_text())
    assert record["r"] == 4 and record["alpha"] == 8.0 and record["target_modules"][0] == "attn1.proj_qkv"
    assert record["base"] and record["base"].endswith("transformer")


def test_resuming_from_lora_load_continues_exactly(runs):
    root, _ = runs
    full, resumed = _metrics(root / "full"), _metrics(root / "resumed")
    for it in (3, 4):
        assert (full[it]["loss"], full[it]["grad_norm"]) == (resumed[it]["loss"], resumed[it]["grad_norm"]), it
    a, b = _payload(root / "full", 4)["model"], _payload(root / "resumed", 4)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lora_flags_are_checked_before_anything_is_built(tmp_path):
    paths = write_training_configs(tmp_path / "w")
    with pytest.raises(ArgumentError, match="not LoRA targets of the StepVideo DiT"):
        parse_args(train_argv(paths, tmp_path / "s", iters=1, extra=["--lora-target-modules", "attn1.to_q"]),
                   entry="pretrain")
    with pytest.raises(ArgumentError, match="--lora-load needs --lora-target-modules"):
        parse_args(train_argv(paths, tmp_path / "s", iters=1, extra=["--lora-load", str(tmp_path)]),
                   entry="pretrain")
    with pytest.raises(ArgumentError, match="use --ckpt-format torch"):
        parse_args(train_argv(paths, tmp_path / "s", iters=1, extra=LORA + ["--ckpt-format", "torch_dist"]),
                   entry="pretrain")
