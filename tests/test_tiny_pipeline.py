"""The README's main command: the whole user-guide workflow on tiny weights, each stage its real command."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_tiny_pipeline_runs_every_stage(tmp_path):
    work = tmp_path / "tiny_run"
    proc = subprocess.run([sys.executable, str(REPO / "examples/stepvideo/tiny/run_pipeline.py"), "--workdir",
                           str(work)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for stage in ("convert", "features", "pretrain", "inference", "preference", "dpo", "export", "lora",
                  "lora-merge", "lora-peft", "lora-infer", "merged-infer"):
        assert f"  {stage}" in proc.stdout and (work / "logs" / f"{stage}.log").is_file()
    assert sorted(p.name for p in (work / "samples").glob("*.mp4")) == [
        "video_0.mp4", "video_1.mp4", "video_2.mp4", "video_3.mp4", "video_grid.mp4"]
    pairs = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 and all(p["score"] >= p["score_rejected"] for p in pairs)
    assert (work / "dpo" / "latest_checkpointed_iteration.txt").read_text() == "2"
    exported = load_file(str(work / "exported_transformer" / "diffusion_pytorch_model.safetensors"))
    original = {}
    for f in (work / "weights/stepvideo-t2v/transformer").glob("*.safetensors"):
        original.update(load_file(str(f)))
    assert set(exported) == set(original)  # official names and layout
    assert not torch.equal(exported["proj_out.weight"], original["proj_out.weight"])  # trained, then DPO-trained
    # LoRA: the adapter alone was saved, exported peft-style with the official names, and it changed the samples
    # (the demo itself stops when it changed nothing or when merged and unmerged sampling differ).
    assert "LoRA: the adapter moves the final latents by" in proc.stdout
    adapter = torch.load(work / "lora/iter_0000004/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]
    assert adapter and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    peft = load_file(str(work / "lora_peft" / "adapter_model.safetensors"))
    assert "base_model.model.transformer_blocks.0.attn1.wqkv.lora_B.weight" in peft
    assert json.loads((work / "lora_peft" / "adapter_config.json").read_text())["r"] == 4
    base, lora = (torch.load(work / folder / "latents_0.pt") for folder in ("samples", "lora_samples"))
    assert not torch.equal(base, lora)
