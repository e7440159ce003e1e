"""The converter and LoRA adapters: merge into the base at any TP (Megatron layout and official export), equal to
the unmerged adapter; the adapter alone exported peft-style with the official names, which peft itself loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mindspeed_mm.checkpoint import stepvideo_adapter as adapter
from mindspeed_mm.checkpoint.atomic import save_ranks
from mindspeed_mm.checkpoint.conversion_checks import ConversionError
from mindspeed_mm.checkpoint.convert import export, export_adapter, merge, split
from mindspeed_mm.checkpoint.megatron_source import read_megatron_full
from mindspeed_mm.checkpoint.official_source import OFFICIAL_WEIGHTS
from mindspeed_mm.models.lora import apply_lora
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.training import pretrain
from tests.helpers.training_fixtures import TINY_DIT, train_argv, write_training_configs

TARGETS = ["attn1.proj_qkv", "attn1.proj_out", "attn2.proj_q", "attn2.proj_kv", "ff.net.0.proj", "ff.net.2"]
LORA = ["--lora-target-modules", *TARGETS, "--lora-r", "4", "--lora-alpha", "8"]
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter trained 3 steps at a high rate on the tiny features, and the base in the Megatron layout."""
    root = tmp_path_factory.mktemp("lora_convert")
    paths = write_training_configs(root / "w")
    argv = train_argv(paths, root / "adapter", iters=3, extra=LORA + ["--save-interval", "3"])
    argv[argv.index("--lr") + 1] = argv[argv.index("--min-lr") + 1] = "2e-2"
    pretrain(argv)
    split(paths["dit"], root / "base", 1, [TINY_DIT["num_layers"]], TINY_DIT["num_layers"], **QUIET)
    return root, paths


def _adapted_dit(root) -> StepVideoDiT:
    """The base with the trained adapter applied, unmerged."""
    dit = StepVideoDiT.from_pretrained(str(root / "base"), dtype="fp32").eval()
    apply_lora(dit, TARGETS, r=4, alpha=8)
    adapters, _ = read_megatron_full(root / "adapter", **QUIET)
    own = dict(dit.named_parameters())
    with torch.no_grad():
        for key, value in adapters.items():
            own[key].copy_(value)
    return dit


def _forward(dit: StepVideoDiT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, TINY_DIT["in_channels"], 2, 2, generator=gen)
    prompt = [torch.randn(2, 10, 16, generator=gen), torch.randn(2, 5, 8, generator=gen)]
    masks = [torch.ones(2, 10, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)]
    with torch.no_grad():
        return dit(x, torch.tensor([0.3, 0.8]), prompt, masks)


def _tp2_copy(src, dst) -> None:
    """The same adapter saved at TP 2 (as a TP2 run writes it: B of column layers split per fused part)."""
    full, _ = read_megatron_full(src, **QUIET)
    ranks = {(r, 0): adapter.shard_state_dict(full, r, 2) for r in range(2)}
    save_ranks(dst, ranks, 1, lambda m: None)
    record = next(src.glob("iter_*/lora.json"))
    (dst / "release" / "lora.json").write_text(record.read_text())


def test_merged_checkpoint_equals_the_unmerged_adapter_at_any_tp(trained):
    root, _ = trained
    unmerged = _forward(_adapted_dit(root))
    base = _forward(StepVideoDiT.from_pretrained(str(root / "base"), dtype="fp32").eval())
    assert (unmerged - base).abs().max() > 1e-3  # the trained adapter changes the output
    _tp2_copy(root / "adapter", root / "adapter_tp2")
    for name, lora, tp in (("merged_tp1", "adapter", 1), ("merged_tp2", "adapter_tp2", 2)):
        merge(root / "base", root / name, tp, [2], 2, lora_load=root / lora, **QUIET)
        merged_full, info = read_megatron_full(root / name, **QUIET)
        assert info["tp"] == tp and not any(k.endswith(("lora_A", "lora_B")) for k in merged_full)
    merged = _forward(StepVideoDiT.from_pretrained(str(root / "merged_tp1"), dtype="fp32").eval())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)
    # the TP2 adapter merged and re-split for TP 2 joins back into the same weights
    a, _ = read_megatron_full(root / "merged_tp1", **QUIET)
    b, _ = read_megatron_full(root / "merged_tp2", **QUIET)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # W + B A alpha/r, by hand, for the fused QKV of block 1
    base_full, _ = read_megatron_full(root / "base", **QUIET)
    lora, _ = read_megatron_full(root / "adapter", **QUIET)
    layer = "transformer_blocks.1.attn1.proj_qkv"
    want = base_full[f"{layer}.weight"] + lora[f"{layer}.lora_B"] @ lora[f"{layer}.lora_A"] * 2.0
    torch.testing.assert_close(a[f"{layer}.weight"], want, rtol=0, atol=1e-6)


def test_export_with_the_adapter_writes_the_merged_official_folder(trained):
    root, paths = trained
    export(root / "base", root / "exported", lora_load=root / "adapter", **QUIET)
    merge(root / "base", root / "merged", 1, [2], 2, lora_load=root / "adapter", **QUIET)
    exported = load_file(str(root / "exported" / OFFICIAL_WEIGHTS))
    original = load_file(str(paths["dit"] / OFFICIAL_WEIGHTS))
    assert set(exported) == set(original)
    assert not torch.equal(exported["transformer_blocks.0.attn1.wqkv.weight"],
                           original["transformer_blocks.0.attn1.wqkv.weight"])
    a = _forward(StepVideoDiT.from_pretrained(str(root / "exported"), dtype="fp32").eval())
    b = _forward(StepVideoDiT.from_pretrained(str(root / "merged"), dtype="fp32").eval())
    assert torch.equal(a, b)


def _official_tree(state: dict, layers) -> nn.Module:
    """A module tree with the official names holding only `layers` (nn.Linear, with the given weights)."""
    root = nn.Module()
    for layer in layers:
        weight = state[f"{layer}.weight"]
        bias = state.get(f"{layer}.bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        parent = root
        *path, leaf = layer.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, linear)
    return root


def test_peft_export_has_the_official_names_and_loads_in_peft(trained):
    from peft import PeftModel

    root, paths = trained
    export_adapter(root / "adapter", root / "peft", **QUIET)
    tensors = load_file(str(root / "peft" / "adapter_model.safetensors"))
    config = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(["attn1.wqkv", "attn1.wo", "attn2.wq", "attn2.wkv",
                                                       "ff.net.0.proj", "ff.net.2"])
    assert "base_model.model.transformer_blocks.0.attn1.wqkv.lora_B.weight" in tensors
    assert not any("proj_qkv" in k or "proj_kv" in k for k in tensors)
    # peft merges the exported adapter into the official base: the official export of our merge, to rounding.
    original = load_file(str(paths["dit"] / OFFICIAL_WEIGHTS))
    layers = sorted({k[len("base_model.model."):].rsplit(".", 2)[0] for k in tensors})
    model = PeftModel.from_pretrained(_official_tree(original, layers), str(root / "peft")).merge_and_unload()
    export(root / "base", root / "exported_for_peft", lora_load=root / "adapter", **QUIET)
    exported = load_file(str(root / "exported_for_peft" / OFFICIAL_WEIGHTS))
    for layer in layers:
        got = model.get_submodule(layer).weight
        torch.testing.assert_close(got, exported[f"{layer}.weight"], rtol=0, atol=2e-6, msg=layer)
        assert not torch.equal(got, original[f"{layer}.weight"])


def test_converter_refuses_what_does_not_fit(trained, tmp_path):
    root, _ = trained
    with pytest.raises(ConversionError, match="is not a LoRA adapter checkpoint"):
        merge(root / "base", tmp_path / "x", 1, [2], 2, lora_load=root / "base", **QUIET)
    with pytest.raises(ConversionError, match="--lora-alpha 4.0 disagrees"):
        merge(root / "base", tmp_path / "x", 1, [2], 2, lora_load=root / "adapter", lora_alpha=4.0, **QUIET)
    from mindspeed_mm.tiny.dit import write_tiny_dit

    # the same architecture, but wider (4 heads x 16): not the base the adapter was trained on
    wide = write_tiny_dit(tmp_path / "wide", num_shards=1, **{**TINY_DIT, "head_dim": 16})
    split(wide, tmp_path / "wide_base", 1, [2], 2, **QUIET)
    with pytest.raises(ConversionError, match="does not fit the base"):
        merge(tmp_path / "wide_base", tmp_path / "x", 1, [2], 2, lora_load=root / "adapter", **QUIET)
    assert not (tmp_path / "x").exists()


def test_converter_cli_lora_flags(trained, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "stepvideo"))
    from convert_ckpt_to_mm import main

    root, _ = trained
    with pytest.raises(ConversionError, match="--save-lora-to-hf writes an adapter alone"):
        main(["--mode", "merge", "--source_path", str(root / "base"), "--target_path", str(tmp_path / "a"),
              "--num_layers", "2", "--save-lora-to-hf"])
    with pytest.raises(ConversionError, match="disagree with the adapter's lora.json"):
        main(["--mode", "merge", "--source_path", str(root / "base"), "--target_path", str(tmp_path / "a"),
              "--num_layers", "2", "--lora-load", str(root / "adapter"), "--lora-target-modules", "ff.net.2"])
    assert main(["--mode", "export", "--lora-load", str(root / "adapter"), "--target_path", str(tmp_path / "p"),
                 "--save-lora-to-hf"]) == 0
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    assert main(["--mode", "merge", "--source_path", str(root / "base"), "--target_path", str(tmp_path / "m"),
                 "--num_layers", "2", "--tp_size", "2", "--lora-load", str(root / "adapter"), "--lora-r", "4"]) == 0
    assert (tmp_path / "m" / "release" / "mp_rank_01" / "model_optim_rng.pt").is_file()
