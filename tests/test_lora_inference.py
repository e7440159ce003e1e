"""Inference with a LoRA adapter, unmerged (the model JSON's `lora` section or --lora-load, with a scale), against
the converter's merged checkpoint: the same final latents in fp32, and within bf16 rounding in bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference_sora import main
from mindspeed_mm.arguments import ArgumentError
from mindspeed_mm.checkpoint.atomic import save_ranks
from mindspeed_mm.checkpoint.convert import merge, split
from mindspeed_mm.models.lora import apply_lora, lora_state_dict
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.tiny.download import write_tiny_download
from tests.helpers.inference_fixtures import inference_argv, model_json, write_lines

TARGETS = ["attn1.proj_qkv", "attn2.proj_kv", "ff.net.2"]


def _write_adapter(base: Path, out: Path) -> Path:
    """An adapter of the base, with random A and B, saved as a LoRA run saves it (rank files + lora.json)."""
    dit = StepVideoDiT.from_pretrained(str(base), dtype="fp32")
    apply_lora(dit, TARGETS, r=4, alpha=8)
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in lora_state_dict(dit).items()}
    save_ranks(out, {(0, 0): state}, 1, lambda m: None, iteration=3)
    (out / "iter_0000003" / "lora.json").write_text(json.dumps({"r": 4, "alpha": 8.0, "dropout": 0.0,
                                                                "target_modules": TARGETS, "base": str(base)}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_inference")
    sections = write_tiny_download(root / "weights", task="t2v")
    base = split(sections["predictor"]["from_pretrained"], root / "base", 1, [2], 2, log=lambda m: None)
    adapter = _write_adapter(Path(base), root / "adapter")
    merge(base, root / "merged", 1, [2], 2, lora_load=adapter, log=lambda m: None)
    prompt = write_lines(root / "prompts.txt", ["a cat walks along a windowsill"])
    return root, sections, prompt


def _latents(tiny, name: str, load: str, dtype: str = "fp32", lora=None, flags=(), monkeypatch=None):
    root, sections, prompt = tiny
    out = root / name
    model = model_json(sections, "t2v", root, prompt=prompt, save_path=out, use_from_pretrained=False,
                       name=f"{name}.json")
    cfg = json.loads(model.read_text())
    cfg["dtype"] = cfg["predictor"]["dtype"] = dtype
    if lora is not None:
        cfg["lora"] = lora
    model.write_text(json.dumps(cfg))
    monkeypatch.setenv("MINDSPEED_MM_SAVE_LATENTS", "1")
    assert main(inference_argv(model, load=root / load) + list(flags)) == 0
    return torch.load(out / "latents_0.pt").float()


def test_unmerged_adapter_equals_the_merged_checkpoint(tiny, monkeypatch):
    root = tiny[0]
    base = _latents(tiny, "base", "base", monkeypatch=monkeypatch)
    unmerged = _latents(tiny, "unmerged", "base", lora={"path": str(root / "adapter")}, monkeypatch=monkeypatch)
    merged = _latents(tiny, "merged", "merged", monkeypatch=monkeypatch)
    change = (unmerged - base).abs().max().item()
    assert change > 1e-2  # the adapter changes the video
    assert (merged - unmerged).abs().max().item() <= 1e-5 * max(1.0, unmerged.abs().max().item())
    # --lora-load with scale 0: the base exactly; the flag overrides the JSON's path
    off = _latents(tiny, "off", "base", lora={"path": "/nowhere", "scale": 0.0},
                   flags=["--lora-load", str(root / "adapter")], monkeypatch=monkeypatch)
    assert torch.equal(off, base)


def test_in_bf16_merged_and_unmerged_agree_within_bf16_rounding(tiny, monkeypatch):
    root = tiny[0]
    fp32 = _latents(tiny, "unmerged32", "base", lora={"path": str(root / "adapter")}, monkeypatch=monkeypatch)
    unmerged = _latents(tiny, "unmerged16", "base", "bf16", lora={"path": str(root / "adapter")},
                        monkeypatch=monkeypatch)
    merged = _latents(tiny, "merged16", "merged", "bf16", monkeypatch=monkeypatch)
    base = _latents(tiny, "base16", "base", "bf16", monkeypatch=monkeypatch)
    rounding = (unmerged - fp32).abs().mean().item()  # what bf16 itself costs, unmerged
    assert (merged - unmerged).abs().mean().item() <= 2 * rounding
    assert (unmerged - base).abs().mean().item() > 5 * rounding  # the adapter's effect is far above rounding


def test_a_bad_adapter_path_is_refused_before_loading(tiny, monkeypatch):
    root = tiny[0]
    with pytest.raises(ArgumentError, match="is not the --save folder of a LoRA run"):
        _latents(tiny, "bad", "base", lora={"path": str(root / "base")}, monkeypatch=monkeypatch)
