"""Spatial tiling: window grid, blending weights, exactness on local maps, VAE integration, memory bound."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from mindspeed_mm.models.ae import StepVideoVAE
from mindspeed_mm.models.ae.blocks import CausalConv
from mindspeed_mm.models.ae.tiling import ramp_weights, tile_starts, tiled_apply
from mindspeed_mm.tiny.vae import TINY_VAE_CONFIG, init_random_weights


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size, tile, overlap", [(64, 32, 16), (80, 32, 16), (100, 40, 8), (32, 32, 8), (20, 32, 8),
                                                 (96, 32, 0), (33, 16, 15)])
def test_windows_cover_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    length = min(tile, size)
    assert starts[0] == 0 and starts[-1] + length == size
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + length - b >= overlap  # consecutive windows overlap by at least `overlap`
        assert b - a <= tile - overlap


def test_ramps_cross_fade_and_stay_positive():
    starts = tile_starts(80, 32, 16)  # [0, 16, 32, 48]
    scale = Fraction(1)
    total = torch.zeros(80)
    for i, s in enumerate(starts):
        w = ramp_weights(starts, i, 32, scale)
        assert (w > 0).all() and w.max() <= 1
        total[s:s + 32] += w
    assert torch.allclose(total, torch.ones(80), atol=1e-6)  # regular grid: ramps sum to one
    # at an image border the weight is flat
    assert ramp_weights(starts, 0, 32, scale)[0] == 1 and ramp_weights(starts, 3, 32, scale)[-1] == 1
    # scaled to output units (decode: x16)
    assert ramp_weights([0, 2], 0, 4, Fraction(16)).shape == (64,)


def _pool4(x):
    b, t, c, h, w = x.shape
    return F.avg_pool2d(x.reshape(b * t, c, h, w), 4).reshape(b, t, c, h // 4, w // 4) * 2.0 - 0.5


def _up4(x):
    b, t, c, h, w = x.shape
    y = F.interpolate(x.reshape(b * t, c, h, w), scale_factor=4.0, mode="nearest")
    return torch.tanh(y).reshape(b, t, c, h * 4, w * 4)


@pytest.mark.parametrize("h, w, tile, overlap", [(40, 56, 16, 8), (64, 24, 16, 4), (32, 32, 12, 4)])
def test_tiling_a_local_map_is_exact(h, w, tile, overlap):
    x = torch.randn(2, 3, 5, h, w, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiled_apply(x, _pool4, tile, overlap, Fraction(1, 4)), _pool4(x), rtol=1e-5, atol=1e-6)
    z = torch.randn(1, 2, 4, h // 4, w // 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tiled_apply(z, _up4, tile // 4, overlap // 4, Fraction(4)), _up4(z),
                               rtol=1e-5, atol=1e-6)


def test_tiling_a_global_map_is_not_exact():
    # A control for the test above: a map that depends on the whole frame changes when tiled.
    x = torch.randn(1, 1, 1, 32, 32, generator=torch.Generator().manual_seed(2))

    def centred(v):
        return v - v.mean(dim=(-1, -2), keepdim=True)

    assert (tiled_apply(x, centred, 16, 8, Fraction(1)) - centred(x)).abs().max() > 1e-3


@pytest.fixture(scope="module")
def vae():
    return init_random_weights(StepVideoVAE(device="cpu", **TINY_VAE_CONFIG), 0)


def _video(t, h, w, seed=0):
    return torch.rand((1, t, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_single_tile_is_bitwise_the_untiled_path(vae):
    x = _video(17, 32, 48)
    try:
        vae.disable_tiling()
        z, out = vae.encode(x, sample=False), None
        out = vae.decode(z)
        vae.enable_tiling(48, 16)  # both H and W fit in one window
        assert torch.equal(vae.encode(x, sample=False), z)
        assert torch.equal(vae.decode(z), out)
    finally:
        vae.disable_tiling()


def test_interior_of_a_tile_is_that_tiles_output(vae):
    # Where only one window has weight (outside every overlap) the blend is that window's output.
    x = _video(17, 32, 96, seed=1)
    z = torch.randn(1, 3, 8, 2, 6, generator=torch.Generator().manual_seed(1))
    try:
        vae.enable_tiling(32, 16)  # windows at 0, 16, ..., 64 px; latent windows at 0, 1, ..., 4
        moments = vae.encode_moments(x)
        out = vae.decode(z)
    finally:
        vae.disable_tiling()
    first = vae.encoder(x[..., :32])  # window 0 covers latent columns 0-1; column 0 is its alone
    torch.testing.assert_close(moments[..., :1], first[..., :1], rtol=0, atol=0)
    first_dec = vae.mix(vae.decoder(z[..., :2]).contiguous())  # pixel columns 0-15 belong to window 0 only
    torch.testing.assert_close(out[..., :16], first_dec[..., :16], rtol=0, atol=0)


@pytest.mark.parametrize("version, frames, h, w", [(2, 18, 48, 80), (1, 17, 24, 40)])
def test_tiled_shapes_and_closeness(version, frames, h, w):
    arch = dict(TINY_VAE_CONFIG) if version == 2 else dict(TINY_VAE_CONFIG, version=1, z_channels=4)
    model = init_random_weights(StepVideoVAE(device="cpu", **arch), 1)
    x = _video(frames, h, w, seed=2)
    z = model.encode(x, sample=False)
    ref = model.decode(z)
    s = model.spatial_factor
    model.enable_tiling(2 * s, s)
    zt = model.encode(x, sample=False)
    out = model.decode(z)
    assert zt.shape == z.shape and out.shape == ref.shape == (1, frames, 3, h, w)
    assert torch.isfinite(zt).all() and torch.isfinite(out).all()
    # Tiny random models are far from local (GroupNorm and attention see only a window); this only
    # guards against misplaced windows, which give errors of the order of the signal itself.
    assert (zt - z).abs().mean() < 0.8 * z.std()
    assert (out - ref).abs().mean() < 0.8 * ref.std()


def test_peak_activation_is_bounded_by_the_tile(vae):
    # The largest tensor any convolution sees is set by the window, not by the frame size.
    sizes = []

    def record(module, inputs, output):
        sizes.append(max(inputs[0].numel(), output.numel()))

    hooks = [m.register_forward_hook(record) for m in vae.modules() if isinstance(m, (CausalConv, torch.nn.Conv2d))]
    try:
        peaks = {}
        for h, w, tiled in [(32, 32, False), (64, 128, True), (96, 96, True), (64, 128, False)]:
            sizes.clear()
            if tiled:
                vae.enable_tiling(32, 16)
            z = vae.encode(_video(1, h, w), sample=False)
            vae.decode(z)
            vae.disable_tiling()
            peaks[(h, w, tiled)] = max(sizes)
    finally:
        for hook in hooks:
            hook.remove()
        vae.disable_tiling()
    assert peaks[(64, 128, True)] == peaks[(96, 96, True)] == peaks[(32, 32, False)]
    assert peaks[(64, 128, False)] == 8 * peaks[(32, 32, False)]
