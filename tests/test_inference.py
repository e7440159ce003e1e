"""StepVideoPipeline on a tiny download (CPU, fp32, 17 frames at 32 x 32): seeds, batched CFG, timestep dtype,
magic strings, the i2v image condition and the input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mindspeed_mm.config import from_dict
from mindspeed_mm.config.model import MMModelConfig
from mindspeed_mm.inference import (NEGATIVE_MAGIC, POSITIVE_MAGIC, InferenceConfigError, StepVideoPipeline,
                                    cover_crop_geometry, image_to_video, load_image, make_generator, to_uint8)
from mindspeed_mm.models.ae import StepVideoI2VProcessor, StepVideoVAE
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
from mindspeed_mm.tiny.download import write_tiny_download
from tests.helpers.inference_fixtures import pattern_image, write_png

SIZE = (17, 32, 32)
PROMPTS = ["a cat walks along a windowsill", "一只猫"]


class Models:
    def __init__(self, root, task):
        sections = write_tiny_download(root, task=task)
        self.cfg = from_dict(MMModelConfig, sections, source="tiny")
        self.encoder = StepVideoTextEncoder.from_configs(self.cfg.text_encoder, self.cfg.tokenizer)
        self.vae = StepVideoVAE.from_config(self.cfg.ae)
        self.dit = StepVideoDiT.from_pretrained(self.cfg.predictor.from_pretrained, self.cfg.predictor).eval()
        self.task = task

    def pipeline(self, dit=None, **kw) -> StepVideoPipeline:
        kw.setdefault("num_inference_steps", 2)
        kw.setdefault("input_size", SIZE)
        return StepVideoPipeline(dit or self.dit, self.vae, self.encoder, None, model_type=self.task, **kw)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory, one_thread):
    return Models(tmp_path_factory.mktemp("t2v") / "weights", "t2v")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory, one_thread):
    return Models(tmp_path_factory.mktemp("i2v") / "weights", "i2v")


class Recorder:
    """Records the arguments of every DiT forward (a forward pre-hook; the DiT runs unchanged)."""

    def __init__(self, dit):
        self.calls = []
        self.handle = dit.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        latents, timestep, prompt, mask = args
        self.calls.append({"latents": latents.clone(), "timestep": timestep.clone(),
                           "prompt": [p.clone() for p in prompt], "mask": [m.clone() for m in mask],
                           **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_videos_are_uint8_and_reproducible_per_seed(t2v):
    pipe = t2v.pipeline()
    first = pipe(PROMPTS, seeds=[7, 8])
    assert first.shape == (2, 17, 32, 32, 3) and first.dtype == torch.uint8
    assert torch.equal(first, pipe(PROMPTS, seeds=[7, 8]))
    other = pipe(PROMPTS, seeds=[7, 9])
    assert torch.equal(other[0], first[0]) and not torch.equal(other[1], first[1])
    # The noise of a video comes from its own CPU generator: the documented seed -> noise mapping.
    noise = pipe.prepare_latents([make_generator(7)])
    assert torch.equal(noise[0], torch.randn((3, 8, 2, 2), generator=torch.Generator().manual_seed(7)))


def test_batched_guidance_equals_one_prompt_at_a_time(t2v):
    pipe = t2v.pipeline()
    batched = pipe(PROMPTS, seeds=[3, 4], output="latent")
    alone = torch.cat([pipe([p], seeds=[s], output="latent") for p, s in zip(PROMPTS, [3, 4])])
    scale = alone.abs().max()
    assert torch.allclose(batched, alone, rtol=0, atol=1e-5 * scale)
    videos = pipe.decode(batched)
    assert (videos.int() - pipe.decode(alone).int()).abs().max() <= 1
    # The two prompts really are different videos, so the comparison above is not trivial.
    assert (alone[0] - alone[1]).abs().max() > 0.1 * scale


def test_one_step_is_uncond_plus_scale_times_difference(t2v):
    pipe = t2v.pipeline(num_inference_steps=1, guidance_scale=9.0)
    text = pipe.encode_prompts(PROMPTS)
    noise = pipe.prepare_latents([make_generator(5), make_generator(6)])
    out = pipe.denoise(noise, text)
    with torch.no_grad():
        t = torch.zeros(2)
        neg = [n.expand(2, *n.shape[1:]) for n in text.negative_prompt]
        neg_mask = [m.expand(2, *m.shape[1:]) for m in text.negative_mask]
        cond = t2v.dit(noise, t, text.prompt, text.mask)
        uncond = t2v.dit(noise, t, neg, neg_mask)
    expected = noise + (uncond + 9.0 * (cond - uncond)) * 1.0  # sigmas are [0, 1] for one step
    assert torch.allclose(out, expected, rtol=0, atol=1e-5 * expected.abs().max())
    swapped = noise + (cond + 9.0 * (uncond - cond))
    assert not torch.allclose(out, swapped, rtol=0, atol=1e-2 * expected.abs().max())
    # Without guidance the DiT sees the conditional batch only.
    with Recorder(t2v.dit) as rec:
        t2v.pipeline(num_inference_steps=1, guidance_scale=1.0)(PROMPTS, seeds=[5, 6])
    assert rec.calls[0]["latents"].shape[0] == 2


def test_bf16_dit_gets_the_timestep_rounded_to_bf16(t2v):
    dit = StepVideoDiT.from_pretrained(t2v.cfg.predictor.from_pretrained, t2v.cfg.predictor, dtype="bf16").eval()
    pipe = t2v.pipeline(dit=dit, num_inference_steps=4)
    with Recorder(dit) as rec:
        pipe(PROMPTS[:1], seeds=[0], output="latent")
    sigmas = pipe.scheduler.sigmas
    seen = torch.stack([c["timestep"][0] for c in rec.calls])
    assert all(c["timestep"].dtype == torch.bfloat16 and c["latents"].dtype == torch.bfloat16 for c in rec.calls)
    assert all(c["timestep"].shape == (2,) for c in rec.calls)  # cond and uncond rows
    assert torch.equal(seen, sigmas[:-1].to(torch.bfloat16))
    assert not torch.equal(seen.float(), sigmas[:-1])  # the rounding is real for these t


def test_magic_strings_reach_the_text_encoders(t2v):
    pipe = t2v.pipeline(num_inference_steps=1)
    prompt = PROMPTS[0]
    assert pipe.conditioning_texts([prompt]) == ([prompt + POSITIVE_MAGIC["t2v"]], NEGATIVE_MAGIC["t2v"])
    assert POSITIVE_MAGIC["t2v"] != POSITIVE_MAGIC["i2v"] and NEGATIVE_MAGIC["t2v"] != NEGATIVE_MAGIC["i2v"]

    def llm_lengths(texts):
        return t2v.encoder.llm_tokenizer(texts)[1].sum(dim=1).tolist()

    with Recorder(t2v.dit) as rec:
        default = pipe([prompt], seeds=[0], output="latent")
    mask = rec.calls[0]["mask"][0]
    assert mask.sum(dim=1).tolist() == llm_lengths([prompt + POSITIVE_MAGIC["t2v"], NEGATIVE_MAGIC["t2v"]])
    assert llm_lengths([prompt + POSITIVE_MAGIC["t2v"]])[0] > llm_lengths([prompt])[0]
    states = t2v.encoder([prompt + POSITIVE_MAGIC["t2v"]])[0][0]
    assert torch.allclose(rec.calls[0]["prompt"][0][:1], states, atol=1e-5)

    custom = t2v.pipeline(num_inference_steps=1, positive_magic="", negative_magic="ugly")
    with Recorder(t2v.dit) as rec:
        changed = custom([prompt], seeds=[0], output="latent")
    assert rec.calls[0]["mask"][0].sum(dim=1).tolist() == llm_lengths([prompt, "ugly"])
    assert not torch.allclose(default, changed)


def test_input_checks(t2v, i2v):
    with pytest.raises(InferenceConfigError, match="input_size: 20 frames"):
        t2v.pipeline(input_size=(20, 32, 32))
    with pytest.raises(InferenceConfigError, match="multiples of 16"):
        StepVideoPipeline(t2v.dit, t2v.vae, t2v.encoder, input_size=(17, 40, 32), num_inference_steps=1)
    with pytest.raises(InferenceConfigError, match="model_type is 'i2v' but the DiT is a t2v model"):
        StepVideoPipeline(t2v.dit, t2v.vae, model_type="i2v", input_size=SIZE, num_inference_steps=1)
    with pytest.raises(InferenceConfigError, match="num_inference_timesteps"):
        StepVideoPipeline(t2v.dit, t2v.vae, input_size=SIZE)
    pipe = i2v.pipeline()
    with pytest.raises(ValueError, match="one image per video"):
        pipe(PROMPTS, seeds=[0, 1])
    with pytest.raises(ValueError, match="one seed per video"):
        t2v.pipeline()(PROMPTS, seeds=[0])


# ---- i2v -------------------------------------------------------------------------------------


def test_cover_crop_geometry_is_the_official_rounding():
    assert cover_crop_geometry(720, 1280, 544, 992) == (558, 992, 7, 0)
    assert cover_crop_geometry(1000, 1000, 544, 992) == (992, 992, 224, 0)
    assert cover_crop_geometry(400, 1600, 544, 992) == (544, 2176, 0, 592)
    assert cover_crop_geometry(39, 64, 544, 992) == (604, 992, 30, 0)  # 604.5 rounds half to even, as round()
    assert cover_crop_geometry(544, 992, 544, 992) == (544, 992, 0, 0)


def test_image_loading_resize_and_center_crop(tmp_path):
    image = pattern_image(24, 40)
    assert torch.equal(load_image(write_png(tmp_path / "a.png", image)), torch.from_numpy(image))
    with pytest.raises(FileNotFoundError, match="no such image"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    # Exactly the target size: no resize, just ToTensor() * 2 - 1.
    exact = pattern_image(32, 32)
    expected = torch.from_numpy(exact).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.equal(image_to_video(exact, 32, 32)[0, 0], expected)
    # A 32 x 96 image of three colour bands keeps its height; the crop takes the centre band.
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, :32, 0], bands[:, 32:64, 1], bands[:, 64:, 2] = 255, 255, 255
    crop = image_to_video(write_png(tmp_path / "bands.png", bands), 32, 32)
    assert crop.shape == (1, 1, 3, 32, 32)
    assert torch.equal(crop[0, 0, 1], torch.ones(32, 32)) and crop[0, 0, 0].max() == -1 and crop[0, 0, 2].max() == -1
    # Upscaling a small image keeps a constant image constant (antialiased bilinear, no overshoot).
    flat = np.full((10, 12, 3), 200, dtype=np.uint8)
    assert torch.allclose(image_to_video(flat, 32, 32), torch.full((1, 1, 3, 32, 32), 200 / 255 * 2 - 1), atol=1e-6)


def test_i2v_condition_is_the_encoded_image(i2v, tmp_path):
    pipe = i2v.pipeline(num_inference_steps=1)
    first = write_png(tmp_path / "first.png", pattern_image(40, 48))
    with Recorder(i2v.dit) as rec:
        video = pipe(["笑起来"], images=[first], seeds=[11])
    call = rec.calls[0]
    cond = call["image_latents"]
    assert cond.shape == (2, 3, 8, 2, 2) and torch.equal(cond[0], cond[1])  # one copy per CFG half
    assert call["motion_score"] == 5.0
    # Frame 0: the VAE sample of the resized, cropped image, drawn after the video's initial noise; zeros after.
    generator = make_generator(11)
    torch.randn((3, 8, 2, 2), generator=generator)
    expected = StepVideoI2VProcessor()(i2v.vae, image_to_video(first, 32, 32), 3, add_noise=False,
                                       generator=generator)
    assert torch.equal(cond[:1], expected) and cond[0, 0].abs().sum() > 0 and not cond[:, 1:].any()
    other = pipe(["笑起来"], images=[pattern_image(32, 32, phase=90)], seeds=[11])
    assert video.shape == (1, 17, 32, 32, 3) and not torch.equal(video, other)
    with Recorder(i2v.dit) as rec:
        i2v.pipeline(num_inference_steps=1, motion_score=2.0)(["笑起来"], images=[first], seeds=[11])
    assert rec.calls[0]["motion_score"] == 2.0


def test_to_uint8_clamps_and_rounds():
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 0.5]).view(1, 6, 1, 1, 1).expand(1, 6, 3, 2, 2)
    out = to_uint8(video)
    assert out.shape == (1, 6, 2, 2, 3) and out.dtype == torch.uint8
    assert out[0, :, 0, 0, 0].tolist() == [0, 0, 128, 255, 255, 191]
