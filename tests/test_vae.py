"""StepVideoVAE on tiny random models: shapes, chunking, causality, posterior, mix, errors, weights files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mindspeed_mm.config.base import from_dict
from mindspeed_mm.config.model import AEConfig
from mindspeed_mm.models import get_model_class
from mindspeed_mm.models.ae import StepVideoVAE, VAEConfigError, VAEInputError, VAEWeightsError
from mindspeed_mm.tiny.vae import TINY_VAE_CONFIG, init_random_weights, main, write_vae_weights

GOLDEN = Path(__file__).parent / "golden" / "stepvideo"
GOLDEN_ARCH = dict(z_channels=4, encoder_ch=32, encoder_ch_mult=(2, 1, 1, 1), decoder_ch=32,
                   decoder_ch_mult=(2, 1, 1, 1), num_res_blocks=2)
TINY_V1 = dict(TINY_VAE_CONFIG, version=1, z_channels=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(version=2, seed=0, **kw):
    arch = dict(TINY_VAE_CONFIG if version == 2 else TINY_V1)
    arch.update(kw)
    return init_random_weights(StepVideoVAE(device="cpu", **arch), seed)


@pytest.fixture(scope="module")
def v2():
    return tiny(2)


@pytest.fixture(scope="module")
def v1():
    return tiny(1)


def video(t, h, w, seed=0, b=1):
    return torch.rand((b, t, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- construction --------------------------------------------------------------------------


def test_registered_and_built_from_the_seed_json_section():
    assert get_model_class("stepvideovae") is StepVideoVAE
    section = {"model_id": "stepvideovae", "from_pretrained": None, "dtype": "fp32", "z_channels": 8,
               "frame_len": 17, "version": 2, "encoder_ch_mult": [1, 1, 1, 1], "decoder_ch": 32,
               "decoder_ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}
    vae = StepVideoVAE.from_config(from_dict(AEConfig, section, source="model.json"), device="cpu")
    assert (vae.z_channels, vae.version, vae.frame_len, vae.latent_len) == (8, 2, 17, 3)
    assert vae.dtype == torch.float32 and not vae.use_tiling
    assert vae.encoder.conv_in.conv.weight.shape == (32, 3, 3, 3, 3)
    assert vae.decoder.conv_in.conv.weight.shape == (4 * 8 * 8, 8, 3, 3, 3)
    bf16 = StepVideoVAE.from_config(from_dict(AEConfig, dict(section, dtype="bf16"), source="m"), device="cpu")
    assert bf16.dtype == torch.bfloat16


def test_real_width_layout_matches_the_released_checkpoint():
    # Reference §3: 262 tensors and about 498.8M parameters; built on meta, nothing allocated.
    vae = StepVideoVAE(device="meta")
    sd = vae.official_state_dict()
    assert len(sd) == 262
    assert round(sum(v.numel() for v in sd.values()) / 1e5) == 4988
    expected = {
        "encoder.conv_in.conv.weight": (128 // 4, 3, 3, 3, 3),
        "encoder.conv_patchify.conv.conv.weight": (256, 512, 3, 3, 3),
        "encoder.conv_out.conv.weight": (128, 2048, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.downsample.conv.conv.weight": (256, 256, 3, 3, 3),
        "decoder.conv_in.conv.weight": (2048, 64, 3, 3, 3),
        "decoder.conv_unpatchify.conv.conv.weight": (4096, 2048, 3, 3, 3),
        "decoder.up.3.upsample.conv3d.conv1.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3, 3),
        "decoder.up.0.block.2.norm2.weight": (128,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("decoder.conv_out.conv.") for k in sd)
    v1 = StepVideoVAE(device="meta", version=1, z_channels=16).official_state_dict()
    assert not any("patchify" in k for k in v1)
    assert tuple(v1["encoder.conv_out.conv.weight"].shape) == (32, 512, 3, 3, 3)
    assert tuple(v1["decoder.conv_in.conv.weight"].shape) == (512, 16, 3, 3, 3)


def test_golden_config_has_exactly_the_golden_key_set():
    ours = set(StepVideoVAE(device="meta", **GOLDEN_ARCH).official_state_dict())
    with safe_open(str(GOLDEN / "vae_v2.weights.safetensors"), framework="pt") as handle:
        assert ours == set(handle.keys())


# ---- shapes and chunking -------------------------------------------------------------------


def test_frame_count_rules():
    v2 = StepVideoVAE(device="meta", **TINY_VAE_CONFIG)
    v1 = StepVideoVAE(device="meta", **TINY_V1)
    assert [v2.latent_frames(t) for t in (1, 9, 17, 18, 26, 34, 35)] == [1, 2, 3, 4, 5, 6, 7]
    assert [v2.video_frames(t) for t in (1, 2, 3, 4, 5, 6, 7)] == [1, 9, 17, 18, 26, 34, 35]
    assert [v1.latent_frames(t) for t in (1, 5, 9, 13, 17, 18, 34)] == [1, 2, 3, 4, 5, 6, 10]
    assert [v1.video_frames(t) for t in (1, 2, 3, 4, 5, 6, 10)] == [1, 5, 9, 13, 17, 18, 34]
    assert (v2.spatial_factor, v2.temporal_factor, v1.spatial_factor, v1.temporal_factor) == (16, 8, 8, 4)


@pytest.mark.parametrize("frames", [1, 9, 17, 18, 34])
def test_v2_round_trip_shapes(v2, frames):
    z = v2.encode(video(frames, 16, 32))
    assert z.shape == (1, v2.latent_frames(frames), 8, 1, 2)
    out = v2.decode(z)
    assert out.shape == (1, frames, 3, 16, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("frames", [1, 5, 17, 22])
def test_v1_round_trip_shapes(v1, frames):
    z = v1.encode(video(frames, 8, 16, b=2))
    assert z.shape == (2, v1.latent_frames(frames), 4, 1, 2)
    assert v1.decode(z).shape == (2, frames, 3, 8, 16)


def test_chunks_are_encoded_and_decoded_independently(v2):
    x = video(34, 16, 16, seed=3)
    z = v2.encode(x, sample=False)
    torch.testing.assert_close(z[:, 3:], v2.encode(x[:, 17:], sample=False), rtol=1e-5, atol=1e-6)
    out = v2.decode(z)
    second = v2.decode(z[:, 3:])
    inner = slice(1, 17)  # frame 17 (first of chunk 2) is blended with frame 16 by mix()
    torch.testing.assert_close(out[:, 17:][:, inner], second[:, inner], rtol=1e-5, atol=1e-6)


def test_v2_is_causal_v1_normalises_the_whole_clip(v2, v1):
    # v2: per-frame GroupNorm, causal convolutions and causal attention -> the first latent
    # depends only on the first frame, and the first decoded frame only on the first latent.
    x = video(17, 16, 16, seed=4)
    first = v2.encode(x[:, :1], sample=False)
    torch.testing.assert_close(v2.encode(x, sample=False)[:, :1], first, rtol=1e-4, atol=1e-5)
    z = torch.randn(1, 3, 8, 1, 1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(v2.decode(z)[:, :1], v2.decode(z[:, :1]), rtol=1e-4, atol=1e-5)
    # v1: GroupNorm statistics over the whole clip, so later frames change the first latent.
    x1 = video(17, 8, 8, seed=4)
    assert (v1.encode(x1, sample=False)[:, :1] - v1.encode(x1[:, :1], sample=False)).abs().max() > 1e-3
    z1 = torch.randn(1, 5, 4, 1, 1, generator=torch.Generator().manual_seed(5))
    assert (v1.decode(z1)[:, :1] - v1.decode(z1[:, :1])).abs().max() > 1e-3


def test_mix_blends_each_chunk_boundary(v2):
    x = torch.randn(2, 17 * 3 + 1, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    got = v2.mix(x.clone())
    want = x.clone()
    for back in (17, 34, 51):
        front = back - 1
        want[:, back] = 0.6 * x[:, back] + 0.4 * x[:, front]
        want[:, front] = 0.6 * x[:, front] + 0.4 * want[:, back]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    single = torch.randn(1, 17, 3, 2, 2)
    assert torch.equal(v2.mix(single.clone()), single)


# ---- posterior -----------------------------------------------------------------------------


def test_sample_mean_and_generator(v2):
    x = video(17, 16, 16, seed=7)
    moments = v2.encode_moments(x)
    mean, logvar = moments.chunk(2, dim=2)
    torch.testing.assert_close(v2.encode(x, sample=False), mean, rtol=0, atol=0)
    a = v2.encode(x, generator=torch.Generator().manual_seed(1))
    b = v2.encode(x, generator=torch.Generator().manual_seed(1))
    c = v2.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, mean + torch.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)


def test_logvar_is_clamped():
    vae = tiny(2, seed=1)
    with torch.no_grad():
        vae.encoder.conv_out.conv.bias[vae.z_channels:] += 100.0  # logvar far above 20
    x = video(1, 16, 16)
    mean = vae.encode(x, sample=False)
    s = vae.encode(x, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(s, mean + torch.exp(torch.tensor(10.0)) * eps, rtol=1e-5, atol=1e-3)


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [2, 16, 20, 27])
def test_bad_frame_counts(v2, frames):
    with pytest.raises(VAEInputError, match=re.escape("Accepted frame counts are 17*k + r with r in [0, 1, 9]")):
        v2.encode(video(frames, 16, 16))


def test_bad_frame_counts_v1(v1):
    with pytest.raises(VAEInputError, match=re.escape("17*k + r with r in [0, 1, 5, 9, 13]")):
        v1.encode(video(3, 8, 8))


@pytest.mark.parametrize("h, w", [(24, 32), (16, 40), (8, 16)])
def test_bad_frame_size(v2, h, w):
    with pytest.raises(VAEInputError, match=rf"{h}x{w} .*not divisible by 16.*multiples of 16"):
        v2.encode(video(1, h, w))


def test_bad_frame_size_v1(v1):
    v1.encode(video(1, 8, 24))  # multiples of 8 are fine in version 1
    with pytest.raises(VAEInputError, match="not divisible by 8"):
        v1.encode(video(1, 12, 8))


def test_bad_video_channels_and_layout(v2):
    with pytest.raises(VAEInputError, match=r"4 channels on axis 2.*expected 3 \(RGB\).*\(b, T, 3, H, W\)"):
        v2.encode(torch.zeros(1, 17, 4, 16, 16))
    with pytest.raises(VAEInputError, match=r"17 channels on axis 2 \(shape \(1, 3, 17, 16, 16\)\)"):
        v2.encode(torch.zeros(1, 3, 17, 16, 16))  # channels-first layout by mistake
    with pytest.raises(VAEInputError, match=r"5-D tensor \(b, T, 3, H, W\)"):
        v2.encode(torch.zeros(17, 3, 16, 16))
    with pytest.raises(VAEInputError, match="floating point"):
        v2.encode(torch.zeros(1, 1, 3, 16, 16, dtype=torch.uint8))


def test_bad_latents(v2):
    with pytest.raises(VAEInputError, match=r"64 channels on axis 2.*z_channels=8.*\(b, t, 8, h, w\)"):
        v2.decode(torch.zeros(1, 3, 64, 1, 1))
    with pytest.raises(VAEInputError, match=r"5-D tensor \(b, t, 8, h, w\)"):
        v2.decode(torch.zeros(3, 8, 1, 1))
    with pytest.raises(VAEInputError, match="empty"):
        v2.decode(torch.zeros(1, 0, 8, 1, 1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(version=3), "version 3 is not 1"),
    (dict(frame_len=16), r"frame_len 16 is not 1 \+ k\*8"),
    (dict(encoder_ch=48), "multiple of 32"),
    (dict(decoder_ch_mult=(1, 1, 1)), "must have 4 positive entries"),
    (dict(z_channels=16), r"8 x last width \(256\) divisible by 32 x z_channels \(512\)"),
    (dict(tile_sample_size=100), "multiples of 16"),
    (dict(tile_sample_size=64, tile_overlap=64), "tile_overlap < tile_sample_size"),
])
def test_bad_config(kwargs, message):
    arch = dict(TINY_VAE_CONFIG)
    arch.update(kwargs)
    with pytest.raises(VAEConfigError, match=message):
        StepVideoVAE(device="meta", **arch)


# ---- weights files -------------------------------------------------------------------------


def test_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors' \(from_pretrained\) do not exist.*vae_v2"):
        StepVideoVAE(str(tmp_path / "nope.safetensors"), **GOLDEN_ARCH)
    (tmp_path / "vae.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no vae_v2.safetensors \(version 2\); it holds \['vae.safetensors'\]"):
        StepVideoVAE(str(tmp_path), **GOLDEN_ARCH)


def test_mismatched_config_names_file_keys_and_fix():
    golden = str(GOLDEN / "vae_v2.weights.safetensors")
    with pytest.raises(VAEWeightsError) as info:
        StepVideoVAE(golden, **dict(GOLDEN_ARCH, z_channels=8))
    text = str(info.value)
    assert golden in text and "shape mismatches" in text and "decoder.conv_in.conv.weight" in text
    assert "set z_channels=4 to load it" in text
    with pytest.raises(VAEWeightsError) as info:
        StepVideoVAE(golden, **dict(GOLDEN_ARCH, version=1))
    assert "unexpected keys" in str(info.value) and "encoder.conv_patchify.conv.conv.weight" in str(info.value)
    assert "set version=2" in str(info.value)
    with pytest.raises(VAEWeightsError, match=r"missing keys .*\n.*\n?.*set num_res_blocks=2"):
        StepVideoVAE(golden, **dict(GOLDEN_ARCH, num_res_blocks=3))


def test_module_named_file_is_refused(tmp_path):
    vae = tiny(2)
    path = tmp_path / "module_names.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    with pytest.raises(VAEWeightsError, match=r"(?s)decoder\.conv_out\.conv\.conv\.weight.*stores module names"):
        StepVideoVAE(str(path), **TINY_VAE_CONFIG)
    official = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in vae.official_state_dict().items()}, str(official))
    loaded = StepVideoVAE(str(official), device="cpu", **TINY_VAE_CONFIG)
    x = video(17, 16, 16)
    assert torch.equal(loaded.encode(x, sample=False), vae.encode(x, sample=False))


def test_tiny_weights_tool_writes_the_official_layout(tmp_path, capsys):
    section = write_vae_weights(tmp_path / "vae", seed=3)
    file = Path(section["from_pretrained"])
    assert file.name == "vae_v2.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("decoder.conv_out.weight").dtype == torch.float16
    assert "decoder.conv_out.weight" in keys and not any(k.startswith("decoder.conv_out.conv") for k in keys)
    assert keys == set(StepVideoVAE(device="meta", **TINY_VAE_CONFIG).official_state_dict())
    # The returned section is an `ae` config that loads the folder strictly.
    cfg = from_dict(AEConfig, dict(section, dtype="fp32", from_pretrained=str(tmp_path / "vae")), source="t")
    vae = StepVideoVAE.from_config(cfg, device="cpu")
    reference = init_random_weights(StepVideoVAE(device="cpu", **TINY_VAE_CONFIG), 3)
    for key, value in reference.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value.half().float()), key
    main([str(tmp_path / "v1.safetensors"), "--version", "1", "--z-channels", "4", "--seed", "1"])
    printed = json.loads(capsys.readouterr().out)["ae"]
    assert printed["version"] == 1 and printed["z_channels"] == 4
    StepVideoVAE(printed["from_pretrained"], device="cpu", **{k: printed[k] for k in TINY_VAE_CONFIG})
