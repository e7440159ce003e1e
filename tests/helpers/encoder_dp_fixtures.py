"""Tiny raw-video setups for `enable_encoder_dp` tests: a tiny download, 17-frame 32x32 videos, the JSON configs,
the model built as the trainer builds it, and one training iteration's losses and gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tests.helpers.pipeline_fixtures import write_videos


def write_raw_setup(root: Path, task: str = "t2v", samples: int = 4, dpo: bool = False) -> Dict:
    """A tiny `task` download, `samples` videos (pairs of consecutive videos for `dpo`) and the data / model JSON
    files of pretraining (or DPO) on raw videos."""
    from mindspeed_mm.tiny.download import write_tiny_download

    root = Path(root)
    sections = write_tiny_download(root / "weights", task=task)
    videos = root / "videos"
    write_videos(videos, [(f"v{i}.mp4", 17 + 3 * (i % 2)) for i in range(samples)])
    if dpo:
        rows = [{"file": f"v{i}.mp4", "file_rejected": f"v{i + 1}.mp4", "captions": f"clip {i}", "score": 0.8,
                 "score_rejected": 0.2} for i in range(0, samples - 1, 2)]
    else:
        rows = [{"file": f"v{i}.mp4", "captions": ["a cat", "一只猫", "a dog walks", "rain"][i % 4]}
                for i in range(samples)]
    (root / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data = {"dataset_param": {
        "dataset_type": task,
        "basic_parameters": {"data_path": str(root / "data.jsonl"), "data_folder": str(videos)},
        "preprocess_parameters": {"video_reader_type": "PyAVVideo", "train_fps": 8, "skip_frame_num": 0,
                                  "num_frames": 17, "max_height": 32, "max_width": 32},
        "tokenizer_config": sections["tokenizer"]},
        "dataloader_param": {"dataloader_mode": "sampler", "shuffle": False, "drop_last": True,
                             "pin_memory": False}}
    ae = dict(sections["ae"])
    if task == "i2v":
        ae["i2v_processor"] = {"processor_id": "stepvideo_i2v_processor"}
    model = {"task": task, "load_video_features": False, "load_text_features": False, "enable_encoder_dp": False,
             "predictor": sections["predictor"], "text_encoder": sections["text_encoder"], "ae": ae,
             "diffusion": {"model_id": "flow_match_discrete_scheduler", "num_train_timesteps": 1000, "shift": 13.0}}
    histogram = root / "histogram.json"
    histogram.write_text(json.dumps({"0.2-0.30000000000000004": 1, "total_num": 1, "max_num": 1, "min_bin": 2,
                                     "max_bin": 2, "bin_width": 0.1, "bin_size": 1}))
    dpo_section = {"histogram_path": str(histogram), "weight_alpha": 0, "weight_beta": None, "loss_beta": 2000}
    if dpo:
        model["dpo"] = dpo_section
    paths = {"root": root, "sections": sections, "task": task, "z": sections["ae"]["z_channels"],
             "data": root / "data.json", "model": root / "model.json", "dpo_section": dpo_section}
    paths["data"].write_text(json.dumps(data, indent=2, ensure_ascii=False))
    paths["model"].write_text(json.dumps(model, indent=2, ensure_ascii=False))
    return paths


def set_encoder_dp(paths: Dict, enabled: bool, name: str, **updates) -> Path:
    """A copy of the model JSON with enable_encoder_dp set (and `updates`); returns its path."""
    model = json.loads(Path(paths["model"]).read_text())
    model["enable_encoder_dp"] = enabled
    model.update(updates)
    out = Path(paths["root"]) / name
    out.write_text(json.dumps(model, indent=2, ensure_ascii=False))
    return out


def _encoders(setup: Dict):
    from mindspeed_mm.config.base import from_dict
    from mindspeed_mm.config.model import AEConfig, TextEncoderConfig, TokenizerConfig
    from mindspeed_mm.models.ae import StepVideoVAE
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

    s = setup["sections"]
    vae = StepVideoVAE.from_config(from_dict(AEConfig, s["ae"]), device="cpu")
    vae.decode_group = None
    encoder = StepVideoTextEncoder.from_configs([from_dict(TextEncoderConfig, c) for c in s["text_encoder"]],
                                                [from_dict(TokenizerConfig, c) for c in s["tokenizer"]],
                                                device="cpu")
    return vae, encoder


def build_model(setup: Dict, dpo: bool = False, enable_encoder_dp: bool = False, group=None):
    """DiffusionLossModel (or DPOLossModel, reference = actor) on the tiny download, in fp32, as the builders make
    it."""
    from mindspeed_mm.models.diffusion import FlowMatchScheduler
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.models.dpo_loss import DPOLossModel
    from mindspeed_mm.models.diffusion_loss import DiffusionLossModel

    folder = setup["sections"]["predictor"]["from_pretrained"]
    vae, encoder = _encoders(setup)
    i2v = setup["task"] == "i2v"
    options = dict(vae=vae, text_encoder=encoder, i2v=i2v, enable_encoder_dp=enable_encoder_dp, encoder_group=group)
    predictor = StepVideoDiT.from_pretrained(folder, dtype="fp32").train()
    if dpo:
        return DPOLossModel(predictor, FlowMatchScheduler(), StepVideoDiT.from_pretrained(folder, dtype="fp32"),
                            **options)
    return DiffusionLossModel(predictor, FlowMatchScheduler(), **options)


def micro_batches(setup: Dict, mbs: int, count: int, dpo: bool = False) -> List[Dict]:
    """`count` collated micro-batches of `mbs` samples from the raw dataset (DPO: the next video is the loser)."""
    from mindspeed_mm.config import load_config
    from mindspeed_mm.config.data import MMDataConfig
    from mindspeed_mm.data import build_dataset, build_tokenizers, collate

    cfg = load_config(MMDataConfig, str(setup["data"]), "--mm-data")
    ds = build_dataset(cfg, tokenizers=build_tokenizers(cfg.dataset_param), log=False)
    samples = [ds[i % len(ds)] for i in range(mbs * count)]
    if dpo:
        for i, sample in enumerate(samples):
            sample["video_rejected"] = samples[(i + 1) % len(samples)]["video"].flip(-1)
    return [collate(samples[k * mbs:(k + 1) * mbs]) for k in range(count)]


def run_iteration(model, batches: List[Dict], encode_first: bool, seed: int = 5,
                  generators: Optional[list] = None) -> Dict:
    """One iteration as the trainer runs it: per-micro-batch losses, the DiT's gradients and the generators' final
    states. `encode_first`: through `encode_iteration`, with the same generator objects afterwards."""
    generators = generators or [torch.Generator().manual_seed(seed + m) for m in range(len(batches))]
    model.predictor.zero_grad(set_to_none=True)
    if encode_first:
        batches = model.encode_iteration(batches, generators)
    losses = []
    for batch, generator in zip(batches, generators):
        out = model(batch, generator)
        loss = out[0] if isinstance(out, tuple) else out
        (loss.mean() / len(batches)).backward()
        losses.append(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.predictor.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads, "states": [g.get_state() for g in generators]}
