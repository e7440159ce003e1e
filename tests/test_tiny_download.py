"""A tiny official-layout download loads through the real loaders, and the models compose."""

import json

import pytest
import torch

from mindspeed_mm.config import from_dict
from mindspeed_mm.config.model import MMModelConfig
from mindspeed_mm.models.ae import StepVideoVAE
from mindspeed_mm.models.diffusion import FlowMatchScheduler
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
from mindspeed_mm.tiny.download import write_tiny_download
from mindspeed_mm.tiny.vae import smooth_video


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_tiny_download_composes_end_to_end(tmp_path, task):
    sections = write_tiny_download(tmp_path / "stepvideo", task=task)
    assert sorted(p.name for p in (tmp_path / "stepvideo").iterdir()) == [
        "hunyuan_clip", "model_sections.json", "step_llm", "transformer", "vae"]
    cfg = from_dict(MMModelConfig, json.loads((tmp_path / "stepvideo/model_sections.json").read_text()),
                    source="model_sections.json")
    assert cfg.predictor.from_pretrained == sections["predictor"]["from_pretrained"]

    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    prompt, prompt_mask = encoder(["a cat walks along a windowsill", "一只猫"])
    vae = StepVideoVAE.from_config(cfg.ae)
    dit = StepVideoDiT.from_pretrained(cfg.predictor.from_pretrained, cfg.predictor).eval()

    video = smooth_video(17, 32, 32).repeat(2, 1, 1, 1, 1)
    latents = vae.encode(video, sample=False)
    assert latents.shape == (2, 3, cfg.ae.z_channels, 2, 2)
    extra = {}
    if task == "i2v":
        first = vae.encode(video[:, :1], sample=False)
        extra = {"image_latents": torch.cat([first, torch.zeros_like(latents[:, 1:])], dim=1), "motion_score": 5.0}
    scheduler = FlowMatchScheduler(shift=13.0)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    noisy = scheduler.add_noise(latents, noise, t)
    with torch.no_grad():
        velocity = dit(noisy, t, prompt, prompt_mask, **extra)
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()
    predicted_x0 = noisy + (1 - t).view(-1, 1, 1, 1, 1) * velocity  # one Euler step to t = 1
    decoded = vae.decode(predicted_x0, group=None)
    assert decoded.shape == (2, 17, 3, 32, 32)
