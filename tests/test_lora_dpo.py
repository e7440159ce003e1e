"""LoRA-DPO: the reference is the actor's base with its adapters off (one DiT), t2v and i2v; through the real entry
point it trains and saves only the adapters, starts at log 2, resumes exactly, and refuses a start that would make
the reference other weights than the run starts from."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mindspeed_mm.arguments import ArgumentError
from mindspeed_mm.data.datasets import collate
from mindspeed_mm.models.diffusion import FlowMatchScheduler
from mindspeed_mm.models.dpo_loss import DPOLossModel
from mindspeed_mm.models.lora import apply_lora, lora_disabled
from mindspeed_mm.training import pretrain
from mindspeed_mm.training.spec import DPO
from mindspeed_mm.training.train import noise_generator
from tests.helpers.training_eval import feature_samples, load_dit
from tests.helpers.training_fixtures import train_argv, write_dpo_configs

TARGETS = ["attn1.proj_qkv", "attn1.proj_out", "attn2.proj_kv", "ff.net.2"]
LORA = ["--lora-target-modules", *TARGETS, "--lora-r", "4", "--lora-alpha", "8"]


def _adapted(source, seed: int = 0):
    """The tiny DiT with seeded adapters, B random too (B = 0 would make the adapter a no-op)."""
    dit = load_dit(source).train()
    apply_lora(dit, TARGETS, r=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return dit


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_the_reference_is_the_base_with_the_adapters_off(tmp_path, i2v):
    """One DiT with its adapters switched off for the reference gives the loss, metrics and adapter gradients of
    two DiTs (the actor and a separately loaded base). Were the adapters left on, the reference would equal the
    actor and every margin would be 0."""
    paths = write_dpo_configs(tmp_path, i2v=i2v)
    batch = collate(feature_samples(paths)[:2])
    results = []
    for reference in (None, load_dit(paths["dit"])):
        actor = _adapted(paths["dit"])
        model = DPOLossModel(actor, FlowMatchScheduler(), reference, i2v=i2v, loss_beta=1.0)
        loss, metrics = model(batch, noise_generator(1234, 1, 0))
        loss.mean().backward()
        grads = {n: p.grad.clone() for n, p in actor.named_parameters() if p.requires_grad}
        assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)
        assert actor.training and all(m.lora_enabled for m in actor.modules() if hasattr(m, "lora_A"))
        results.append((loss.detach(), metrics, grads))
    (loss1, metrics1, grads1), (loss2, metrics2, grads2) = results
    assert metrics2["rewards/margins"].abs().max() > 1e-6  # the adapter changes the actor: margins are not 0
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=0)
    torch.testing.assert_close(metrics1["rewards/margins"], metrics2["rewards/margins"], rtol=1e-5, atol=1e-7)
    for name in grads2:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-5, atol=1e-9, msg=name)


def test_lora_disabled_restores_the_adapters_after_an_error(tmp_path):
    paths = write_dpo_configs(tmp_path)
    dit = _adapted(paths["dit"])
    with pytest.raises(RuntimeError), lora_disabled(dit):
        assert not any(m.lora_enabled for m in dit.modules() if hasattr(m, "lora_A"))
        raise RuntimeError("boom")
    assert all(m.lora_enabled for m in dit.modules() if hasattr(m, "lora_A"))


def test_dpo_without_a_reference_needs_adapters(tmp_path):
    paths = write_dpo_configs(tmp_path)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        DPOLossModel(load_dit(paths["dit"]), FlowMatchScheduler(), None)


def _metrics(save):
    return {m["iteration"]: m for m in map(json.loads, (save / "metrics.jsonl").read_text().splitlines())}


def _payload(save, iteration):
    return torch.load(save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)


@pytest.fixture(scope="module")
def lora_dpo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dpo")
    paths = write_dpo_configs(root)
    dpo = ["--dpo-beta", "0.1", *LORA]
    pretrain(train_argv(paths, root / "full", iters=4, extra=dpo), DPO)
    pretrain(train_argv(paths, root / "first", iters=2, extra=dpo), DPO)
    pretrain(train_argv(paths, root / "resumed", iters=4, extra=dpo + ["--lora-load", str(root / "first")]), DPO)
    return root, paths


def test_lora_dpo_trains_the_adapters_against_the_base(lora_dpo_runs):
    root, paths = lora_dpo_runs
    metrics = _metrics(root / "full")
    assert abs(metrics[1]["loss"] - math.log(2)) < 1e-6  # B = 0: the actor is its base at step 1
    assert abs(metrics[3]["loss"] - math.log(2)) > 1e-5 and metrics[3]["rewards/margins"] != 0.0
    payload = _payload(root / "full", 4)
    assert payload["model"] and all(k.endswith(("lora_A", "lora_B")) for k in payload["model"])
    record = json.loads((root / "full" / "iter_0000004" / "dpo_reference.json").read_text())
    assert record["lora"] is True and record["path"].endswith("transformer")
    assert json.loads((root / "full" / "iter_0000004" / "lora.json").read_text())["r"] == 4


def test_lora_dpo_resumes_exactly(lora_dpo_runs):
    root, _ = lora_dpo_runs
    full, resumed = _metrics(root / "full"), _metrics(root / "resumed")
    for it in (3, 4):
        assert (full[it]["loss"], full[it]["grad_norm"]) == (resumed[it]["loss"], resumed[it]["grad_norm"]), it
    a, b = _payload(root / "full", 4)["model"], _payload(root / "resumed", 4)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_dpo_refuses_a_pretraining_adapter_and_another_reference(lora_dpo_runs, tmp_path):
    root, paths = lora_dpo_runs
    pretrained = tmp_path / "pretrained_adapter"
    pretrain(train_argv(paths, pretrained, iters=2, extra=LORA))
    with pytest.raises(ArgumentError, match="--mode merge --lora-load"):
        pretrain(train_argv(paths, tmp_path / "s", iters=2, extra=["--dpo-beta", "0.1", *LORA, "--lora-load",
                                                                   str(pretrained)]), DPO)
    model = json.loads(paths["model"].read_text())
    model["dpo"]["reference_path"] = str(root / "full")
    other = tmp_path / "model.json"
    other.write_text(json.dumps(model))
    with pytest.raises(ArgumentError, match="Drop dpo.reference_path"):
        pretrain(train_argv({**paths, "model": other}, tmp_path / "s2", iters=2, extra=["--dpo-beta", "0.1", *LORA]),
                 DPO)
