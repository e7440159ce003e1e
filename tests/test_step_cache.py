"""The first-block step cache of sampling: exact when it never skips, skips when told to, and every rank of a
context-parallel group takes the same decision (tests/distributed/test_pipeline_dist.py, which also checks CFG
parallel; its flag is checked here)."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm.config import from_dict
from mindspeed_mm.config.model import MMModelConfig, PipelineConfig
from mindspeed_mm.inference import StepVideoPipeline
from mindspeed_mm.models.ae import StepVideoVAE
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.predictor.stepvideo.step_cache import FirstBlockCache
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
from mindspeed_mm.tiny.download import write_tiny_download

PROMPTS = ["a cat walks along a windowsill", "一只猫"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    sections = write_tiny_download(tmp_path_factory.mktemp("cache") / "weights", task="t2v")
    cfg = from_dict(MMModelConfig, sections, source="tiny")
    dit = StepVideoDiT.from_pretrained(cfg.predictor.from_pretrained, cfg.predictor).eval()
    vae = StepVideoVAE.from_config(cfg.ae)
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    pipe = StepVideoPipeline(dit, vae, encoder, None, input_size=(17, 32, 32), num_inference_steps=8)
    pipe.sections = sections
    return pipe, pipe.encode_prompts(PROMPTS)


def _sample(pipe, text, threshold, calls=None):
    pipe.first_block_cache_threshold = threshold
    handle = None
    if calls is not None:
        handle = pipe.dit.transformer_blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        return pipe.generate(text=text, seeds=[3, 4], output="latent")
    finally:
        if handle is not None:
            handle.remove()


def test_a_threshold_that_never_skips_is_exact(setup):
    pipe, text = setup
    base = _sample(pipe, text, 0.0)
    assert pipe.dit.step_cache is None
    assert torch.equal(_sample(pipe, text, 1e-12), base)
    assert pipe.last_cache_stats == (8, 0)


def test_the_cache_skips_blocks_and_its_error_grows_with_the_threshold(setup):
    pipe, text = setup
    base = _sample(pipe, text, 0.0)
    errors, passes = {}, {}
    for threshold in (0.3, 100.0):
        calls = []
        latents = _sample(pipe, text, threshold, calls)
        passes[threshold] = len(calls)
        errors[threshold] = ((latents - base).abs().mean() / base.abs().mean()).item()
        assert pipe.dit.step_cache is None  # removed after sampling, also for the next call
    assert pipe.last_cache_stats == (1, 7) and passes[100.0] == 1  # only the first step ran every block
    assert passes[0.3] < 8
    assert 0 < errors[0.3] <= errors[100.0]


def test_threshold_is_read_from_the_inference_json_and_checked(setup):
    pipe, _ = setup
    section = {"first_block_cache_threshold": 0.05, "input_size": [17, 32, 32]}
    cfg = from_dict(MMModelConfig, {"pipeline_config": section, "diffusion": {"num_inference_timesteps": 4}},
                    source="test")
    assert StepVideoPipeline.from_config(cfg, pipe.dit, pipe.vae, None, None).first_block_cache_threshold == 0.05
    with pytest.raises(ValueError, match="must be >= 0"):
        PipelineConfig(first_block_cache_threshold=-1.0).validate()
    with pytest.raises(ValueError, match="must be >= 0"):
        FirstBlockCache(float("nan"))


def test_cfg_parallel_needs_an_even_data_parallel_size(setup, tmp_path):
    from mindspeed_mm.arguments import ArgumentError, parse_args
    from tests.helpers.inference_fixtures import inference_argv, model_json, write_lines

    pipe, _ = setup
    model = model_json(pipe.sections, "t2v", tmp_path, prompt=write_lines(tmp_path / "p.txt", ["a cat"]))
    with pytest.raises(ArgumentError, match="the data-parallel size is 1"):
        parse_args(inference_argv(model) + ["--use-cfg-parallel"], entry="inference")
