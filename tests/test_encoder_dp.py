"""`enable_encoder_dp`, single process: the VAE's posterior / sampling split is `encode` bit for bit, and
`DiffusionLossModel.encode_iteration` (the path that shares encoding over the TP x CP group) gives the losses of
encoding in `forward`, for t2v, i2v and DPO. The multi-process cases: tests/distributed/test_encoder_dp_dist.py."""

from __future__ import annotations

import pytest
import torch

from mindspeed_mm.models.ae import StepVideoVAE
from mindspeed_mm.models.ae.stepvideo_vae import LOGVAR_RANGE
from mindspeed_mm.tiny.vae import TINY_VAE_CONFIG, init_random_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(version=2, dtype=torch.float32):
    arch = dict(TINY_VAE_CONFIG) if version == 2 else dict(TINY_VAE_CONFIG, version=1, z_channels=4)
    return init_random_weights(StepVideoVAE(device="cpu", **arch), 0).to(dtype)


def _video(t, h=32, w=32, b=2, seed=0):
    return torch.rand((b, t, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("version,dtype,frames", [(2, torch.float32, 17), (2, torch.bfloat16, 26),
                                                  (1, torch.float32, 22)])
def test_posterior_then_sample_is_encode_bit_for_bit(version, dtype, frames):
    vae = _vae(version, dtype)
    video = _video(frames, 32 if version == 2 else 16, 32 if version == 2 else 16)
    g_encode, g_split, g_eps, g_formula = (torch.Generator().manual_seed(7) for _ in range(4))
    latents = vae.encode(video, generator=g_encode)
    # the formula of the code before the split: moments, clamp, exp, one float32 draw
    mean, logvar = vae.encode_moments(video).chunk(2, dim=2)
    eps = torch.randn(mean.shape, generator=g_formula, dtype=torch.float32).to(mean.dtype)
    assert torch.equal(latents, mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * eps)
    # the split: posterior (deterministic), then the draw, as one call or with eps drawn before encoding
    assert vae.latent_shape(video.shape) == tuple(latents.shape)
    m, std = vae.encode_distribution(video)
    assert torch.equal(vae.sample(m, std, generator=g_split), latents)
    early = vae.draw_eps(vae.latent_shape(video.shape), g_eps)
    assert torch.equal(vae.sample(*vae.encode_distribution(video), eps=early), latents)
    for g in (g_split, g_eps, g_formula):
        assert torch.equal(g.get_state(), g_encode.get_state())
    assert torch.equal(vae.encode(video, sample=False), mean.contiguous())


# ---- encode_iteration in one process (the group of one rank owns every sample) --------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers.encoder_dp_fixtures import write_raw_setup

    return {task: write_raw_setup(tmp_path_factory.mktemp(f"encoder_dp_{task}"), task, samples=4)
            for task in ("t2v", "i2v")}


@pytest.mark.parametrize("task,dpo,mbs", [("t2v", False, 1), ("i2v", False, 1), ("t2v", False, 2),
                                          ("i2v", True, 1)])
def test_encode_iteration_gives_the_losses_of_encoding_in_forward(tiny, task, dpo, mbs):
    from tests.helpers.encoder_dp_fixtures import build_model, micro_batches, run_iteration

    setup = tiny[task]
    batches = micro_batches(setup, mbs=mbs, count=2, dpo=dpo)
    plain = build_model(setup, dpo=dpo)
    in_group = build_model(setup, dpo=dpo, enable_encoder_dp=True, group=None)
    assert not plain.encodes_in_group and not in_group.encodes_in_group  # a group of one rank shares nothing
    want = run_iteration(plain, batches, encode_first=False)
    got = run_iteration(in_group, batches, encode_first=True)
    # bit for bit, also with 2 samples a micro-batch: a micro-batch is encoded in one call, as forward does
    # (per-sample calls of the VAE's convolutions differ from one batched call by ~1e-6)
    for a, b in zip(want["losses"], got["losses"]):
        assert torch.equal(b, a)
    assert set(got["grads"]) == set(want["grads"]) and want["grads"]
    for name in want["grads"]:
        assert torch.equal(got["grads"][name], want["grads"][name]), name
    for a, b in zip(want["states"], got["states"]):  # the generators end in the same state
        assert torch.equal(a, b)


def test_encoded_batches_do_not_hold_the_pixels(tiny):
    from tests.helpers.encoder_dp_fixtures import build_model, micro_batches

    setup = tiny["i2v"]
    batches = micro_batches(setup, mbs=1, count=2)
    model = build_model(setup, enable_encoder_dp=True, group=None)
    encoded = model.encode_iteration(batches, [torch.Generator().manual_seed(i) for i in range(2)])
    for raw, enc in zip(batches, encoded):
        assert enc["video"].shape[2] == setup["z"] and enc["image_latents"].shape == enc["video"].shape
        assert torch.all(enc["image_latents"][:, 1:] == 0)
        assert enc["prompt"][0].is_floating_point() and enc["prompt"][0].dim() == 3 and "prompt_ids" not in enc
        assert torch.equal(enc["prompt_mask"][0], raw["prompt_mask"][0])
        assert enc["file"] == raw["file"]
    with pytest.raises(ValueError, match="one generator per micro-batch"):
        model.encode_iteration(batches, [torch.Generator()])
