"""StepVideoDiT against the official code's outputs (golden cases, float32).

The fixtures in tests/golden/stepvideo/ were produced by the official StepVideoModel on CPU
(see tests/golden/stepvideo/README.md). Each test writes an official diffusers folder
(config.json from the case's constructor_config + the weights under their official names)
and loads it through `StepVideoDiT.from_pretrained`, the path the released weights take.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.tiny.dit import write_official_dit

GOLDEN = Path(__file__).parent / "golden" / "stepvideo"
CASES = ["dit_t2v", "dit_ti2v"]


def _case(name):
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    weights = load_file(str(GOLDEN / f"{name}.weights.safetensors"))
    io = load_file(str(GOLDEN / f"{name}.io.safetensors"))
    return meta, weights, io


def _tolerance(meta, key):
    tol = meta["suggested_tolerance"]["output.velocity" if key == "output.velocity" else "output.debug.*"]
    return tol["rtol"], tol["atol"]


def _assert_close(meta, key, got, want):
    rtol, atol = _tolerance(meta, key)
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} vs golden {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert torch.allclose(got, want, rtol=rtol, atol=atol), f"{key}: max |diff| {diff:.3e} (rtol {rtol}, atol {atol})"


@pytest.fixture(scope="module", params=CASES)
def loaded(request, tmp_path_factory):
    meta, weights, io = _case(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "transformer"
    # Sharded like the released checkpoint (6 shards + index).
    write_official_dit(folder, weights, meta["constructor_config"], num_shards=3)
    split = meta["non_constructor_settings"]["transformer_blocks.*.attn1.rope_ch_split"]
    model = StepVideoDiT.from_pretrained(folder, dtype="fp32", channel_split=split).eval()
    return meta, io, model


def _inputs(meta, io):
    args = dict(
        latents=io["input.hidden_states"],
        timestep=io["input.timestep"],
        prompt=[io["input.encoder_hidden_states"], io["input.encoder_hidden_states_2"]],
        prompt_mask=[io["input.step_llm_mask"], torch.ones(io["input.encoder_hidden_states_2"].shape[:2])],
    )
    if "input.condition_hidden_states" in io:
        args["image_latents"] = io["input.condition_hidden_states"]
        args["motion_score"] = meta["motion_score"]
    return args


def test_mask_convention_matches_official(loaded):
    meta, io, _ = loaded
    # The official encoder_attention_mask is the step_llm mask left-padded with L_clip ones.
    clip_len = io["input.encoder_hidden_states_2"].shape[1]
    padded = torch.nn.functional.pad(io["input.step_llm_mask"].float(), (clip_len, 0), value=1.0)
    assert torch.equal(padded, io["input.encoder_attention_mask"])


def test_velocity_matches_official(loaded):
    meta, io, model = loaded
    with torch.no_grad():
        out = model(**_inputs(meta, io))
    _assert_close(meta, "output.velocity", out, io["output.velocity"])


def test_intermediates_match_official(loaded):
    meta, io, model = loaded
    captured = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(f"block_{i}", out))
             for i, block in enumerate(model.transformer_blocks)]
    hooks.append(model.adaln_single.register_forward_hook(lambda m, a, out: captured.__setitem__("adaln", out)))
    inputs = _inputs(meta, io)
    try:
        with torch.no_grad():
            model(**inputs)
            text = model.text_states(*inputs["prompt"])
    finally:
        for h in hooks:
            h.remove()
    modulation, embedded = captured["adaln"]
    _assert_close(meta, "output.debug.embedded_timestep", embedded, io["output.debug.embedded_timestep"])
    _assert_close(meta, "output.debug.adaln_modulation", modulation, io["output.debug.adaln_modulation"])
    _assert_close(meta, "output.debug.text_states", text, io["output.debug.text_states"])
    for i in range(meta["constructor_config"]["num_layers"]):
        _assert_close(meta, f"output.debug.block_{i}", captured[f"block_{i}"], io[f"output.debug.block_{i}"])


def test_padded_text_positions_do_not_matter(loaded):
    # Positions past each sample's valid step_llm length are ignored (the golden stores random
    # values there on purpose); changing them must not change the output.
    meta, io, model = loaded
    inputs = _inputs(meta, io)
    llm = inputs["prompt"][0].clone()
    mask = inputs["prompt_mask"][0].bool()
    llm[~mask] = torch.randn(int((~mask).sum()), llm.shape[-1]) * 10
    with torch.no_grad():
        ref = model(**inputs)
        inputs["prompt"] = [llm, inputs["prompt"][1]]
        out = model(**inputs)
    assert torch.allclose(out, ref, atol=1e-6)
