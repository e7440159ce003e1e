"""Encoder and decoder networks of the StepVideo Video-VAE (one chunk at a time).

Both take and return frames-before-channels layouts: the encoder maps a video chunk
(b, T, 3, H, W) to moments (b, t, 2z, h, w), the decoder maps latents (b, t, z, h, w) to
(b, T, 3, H, W). Chunking over long videos, the posterior and blending live in `stepvideo_vae.py`.

Fixed by the official design (not configurable):
- four resolution levels; the encoder halves space after levels 0, 1, 2 and time after levels
  1 and 2 (level 0 is a per-frame 2D downsample); the decoder mirrors this, doubling time and
  space after levels 3 and 2 and space only after level 1;
- version 2 adds a patchify head (x2 in time and space, so 16x spatial and 8x temporal in
  total) with parameter-free shortcuts; version 1 has plain `conv_out` / `conv_in` (8x, 4x).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import (
    AttnBlock,
    CausalConv,
    ConvPatchify,
    ConvUnpatchify,
    Downsample2D,
    Downsample3D,
    Resnet3DBlock,
    Upsample2D,
    Upsample3D,
    duplicate_channels_shuffle,
    group_norm,
    norm_silu_conv,
    unshuffle_channel_average,
)

NUM_LEVELS = 4
ENCODER_TEMPORAL_DOWN_LEVELS = (1, 2)
DECODER_TEMPORAL_UP_LEVELS = (2, 3)
DECODER_DROP_FRAMES = 3  # the official `temporal_downsample - 1`, dropped after the last layer


def patch_channels(z_channels: int) -> int:
    """Width of the version-2 patchified latent: 4 * z * 2^3 (2048 for z = 64)."""
    return 4 * z_channels * 2 ** 3


class _Level(nn.Module):
    """One resolution level; attributes `block` (and `downsample` / `upsample`) as in the checkpoint."""


class _Mid(nn.Module):
    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.block_1 = Resnet3DBlock(channels, channels, per_frame)
        self.attn_1 = AttnBlock(channels, per_frame)
        self.block_2 = Resnet3DBlock(channels, channels, per_frame)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VideoEncoder(nn.Module):
    """(b, T, 3, H, W) chunk -> moments (b, t, 2z, h, w) (mean then logvar on the channel axis)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, version: int,
                 in_channels: int = 3):
        super().__init__()
        self.version = version
        per_frame = version == 2
        self.per_frame = per_frame
        self.z_channels = z_channels
        self.conv_in = CausalConv(in_channels, ch, 3)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = _Level()
            stage.block = nn.ModuleList()
            block_out = ch * mult
            for _ in range(num_res_blocks):
                stage.block.append(Resnet3DBlock(block_in, block_out, per_frame))
                block_in = block_out
            if level != len(ch_mult) - 1:
                if level in ENCODER_TEMPORAL_DOWN_LEVELS:
                    stage.downsample = Downsample3D(block_in)
                else:
                    stage.downsample = Downsample2D(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in, per_frame)
        self.norm_out = nn.GroupNorm(32, block_in)
        out = 2 * z_channels
        if version == 2:
            self.patch = patch_channels(z_channels)
            self.conv_patchify = ConvPatchify(block_in, self.patch)
            self.conv_out = CausalConv(self.patch, out, 3)
        else:
            self.conv_out = CausalConv(block_in, out, 3)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(video.transpose(1, 2))
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        if self.version == 2:
            h = group_norm(h, self.norm_out, self.per_frame, silu=True)
            shortcut = unshuffle_channel_average(h, self.patch, 2)
            h = self.conv_patchify(h).add_(shortcut)
            shortcut = unshuffle_channel_average(h, 2 * self.z_channels, 1)
            h = self.conv_out(h).add_(shortcut)
        else:
            h = norm_silu_conv(h, self.norm_out, self.per_frame, self.conv_out)
        return h.transpose(1, 2)


class VideoDecoder(nn.Module):
    """Latents (b, t, z, h, w) of one chunk -> video (b, T, 3, H, W)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, version: int,
                 out_channels: int = 3):
        super().__init__()
        self.version = version
        per_frame = version == 2
        self.per_frame = per_frame
        self.z_channels = z_channels
        block_in = ch * ch_mult[-1]
        self.block_in = block_in
        if version == 2:
            self.patch = patch_channels(z_channels)
            self.conv_in = CausalConv(z_channels, self.patch, 3)
            self.conv_unpatchify = ConvUnpatchify(self.patch, block_in)
        else:
            self.conv_in = CausalConv(z_channels, block_in, 3)
        self.mid = _Mid(block_in, per_frame)
        levels = []
        for level in reversed(range(len(ch_mult))):
            stage = _Level()
            stage.block = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                stage.block.append(Resnet3DBlock(block_in, block_out, per_frame))
                block_in = block_out
            if level != 0:
                if level in DECODER_TEMPORAL_UP_LEVELS:
                    stage.upsample = Upsample3D(block_in, per_frame)
                else:
                    stage.upsample = Upsample2D(block_in)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = nn.GroupNorm(32, block_in)
        self.conv_out = CausalConv(block_in, out_channels, 3)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.transpose(1, 2)
        h = self.conv_in(z)
        if self.version == 2:
            h.add_(duplicate_channels_shuffle(z, self.patch, 1))
            shortcut = duplicate_channels_shuffle(h, self.block_in, 2)
            h = self.conv_unpatchify(h).add_(shortcut)
            del shortcut
        h = self.mid(h)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = norm_silu_conv(h, self.norm_out, self.per_frame, self.conv_out)
        return h[:, :, DECODER_DROP_FRAMES:].transpose(1, 2)
