"""Layers of the StepVideo Video-VAE.

Tensors are channel-first, (b, c, t, h, w), inside the networks. Module and attribute names
follow the official checkpoint keys (`conv1.conv.weight`, `upsample.conv3d.norm1.bias`, ...),
so a released `vae_v2.safetensors` loads with a plain strict `load_state_dict` once the one
on-disk rename (`decoder.conv_out.*` -> `decoder.conv_out.conv.*`) is applied.

Two normalisation regimes exist: version 2 normalises each frame on its own (GroupNorm
statistics over C/32 x H x W of one frame), version 1 over the whole clip (C/32 x T x H x W).
Every layer takes that choice as `per_frame`.

Time is causal everywhere: a k-frame kernel sees the current frame and the k-1 before it,
with zeros before the first frame of a chunk.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

NUM_GROUPS = 32
# Per-frame GroupNorm folds frames into the batch in blocks of at most this many elements
# (or one frame): fast, and the temporary copies stay a bounded fraction of a large tensor.
_FRAME_BLOCK_ELEMENTS = 1 << 24
LARGE_CONV_ELEMENTS = 1 << 28


def _triple(v: Union[int, Sequence[int]]) -> Tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    # The ATen op directly: F.group_norm refuses groups of a single value (one channel per group
    # at 1x1 resolution, possible in tiny test widths), where the normalised value is simply 0.
    return torch.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, per_frame: bool, silu: bool,
               pad_frames: int = 0) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a (b, c, t, h, w) tensor, optionally with `pad_frames` zero frames in front.

    `per_frame`: statistics of each frame on its own (version 2), else of the whole clip (version 1).
    The zero frames are the causal time padding of the convolution that follows; they are added
    after the activation, exactly where the convolution would see zeros.
    """
    b, c, t, h, w = x.shape
    out = x.new_empty((b, c, t + pad_frames, h, w))
    if pad_frames:
        out[:, :, :pad_frames].zero_()
    body = out[:, :, pad_frames:]
    if per_frame:
        # Frames are (b, c, h, w) images normalised per sample and group: fold time into the batch,
        # a block of frames at a time so that the temporary copies stay small.
        for i, j in frame_blocks(t, b * c * h * w):
            frames = x[:, :, i:j].transpose(1, 2).reshape(b * (j - i), c, h, w)
            normed = _group_norm(frames, norm)
            body[:, :, i:j] = normed.view(b, j - i, c, h, w).transpose(1, 2)
            del frames, normed
    else:
        body.copy_(_group_norm(x, norm))
    if silu:
        F.silu(body, inplace=True)
    return out


class CausalConv(nn.Module):
    """Conv3d, causal in time (k_t - 1 zero frames in front), zero-padded k // 2 in space.

    Holds its `nn.Conv3d` as `.conv` (checkpoint keys `<name>.conv.weight/bias`).
    `stride` is an int (time only, as in the official layer) or a (t, h, w) tuple.

    A convolution whose input or output reaches `LARGE_CONV_ELEMENTS` is computed in time chunks
    into a preallocated output (the official code splits at 2^30 elements): no padded copy of the
    whole input, smaller kernel calls, and every output frame computed from the same inputs.
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size: Union[int, Sequence[int]] = 3,
                 stride: Union[int, Sequence[int]] = 1):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2))

    def _output_shape(self, x: torch.Tensor, missing: int) -> Tuple[int, ...]:
        conv = self.conv
        b, _, t, h, w = x.shape
        t_out = (t + missing - conv.kernel_size[0]) // conv.stride[0] + 1
        h_out = (h + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        w_out = (w + 2 * conv.padding[2] - conv.kernel_size[2]) // conv.stride[2] + 1
        return b, conv.out_channels, t_out, h_out, w_out

    def is_large(self, x: torch.Tensor, time_padded: bool = False) -> bool:
        """Whether `forward` computes this input in time chunks."""
        shape = self._output_shape(x, 0 if time_padded else self.time_pad)
        return max(x.numel(), math.prod(shape)) >= LARGE_CONV_ELEMENTS and shape[2] >= 2

    def forward(self, x: torch.Tensor, time_padded: bool = False,
                pre: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """`time_padded`: `x` already carries the `time_pad` zero frames in front.

        `pre`: a frame-wise map applied to the input before the zero padding (in time chunks
        for large inputs, so its full-size result never exists).
        """
        missing = 0 if time_padded else self.time_pad  # zero frames still to add in front
        conv = self.conv
        if not self.is_large(x, time_padded):
            if pre is not None:
                x = pre(x)
            if missing:
                x = F.pad(x, (0, 0, 0, 0, missing, 0))
            return conv(x)
        shape = self._output_shape(x, missing)
        t_out, kt, st = shape[2], conv.kernel_size[0], conv.stride[0]
        largest = max(x.numel(), math.prod(shape))
        out = x.new_empty(shape)
        pieces = min(t_out, max(2, -(-largest // LARGE_CONV_ELEMENTS)))
        step = -(-t_out // pieces)
        for o0 in range(0, t_out, step):
            o1 = min(t_out, o0 + step)
            # output frame o reads padded frames [o*st, o*st + kt), i.e. input frames shifted by `missing`
            lo, hi = o0 * st - missing, (o1 - 1) * st + kt - missing
            piece = x[:, :, max(lo, 0):hi]
            if pre is not None:
                piece = pre(piece)
            if lo < 0:
                piece = F.pad(piece, (0, 0, 0, 0, -lo, 0))
            out[:, :, o0:o1] = conv(piece)
            del piece
        return out


def frame_blocks(frames: int, elements_per_frame: int):
    """Ranges of frames holding at most `_FRAME_BLOCK_ELEMENTS` elements each (at least one frame)."""
    step = max(1, _FRAME_BLOCK_ELEMENTS // max(1, elements_per_frame))
    return [(i, min(frames, i + step)) for i in range(0, frames, step)]


def norm_silu_conv(x: torch.Tensor, norm: nn.GroupNorm, per_frame: bool, conv: CausalConv) -> torch.Tensor:
    """conv(causal zero pad(SiLU(GroupNorm(x)))).

    With per-frame statistics and a large input, the normalisation runs inside the convolution's
    time chunks, so the normalised full-size copy of `x` is never held (same values, less memory).
    """
    if per_frame and conv.is_large(x):
        return conv(x, pre=partial(group_norm, norm=norm, per_frame=True, silu=True))
    return conv(group_norm(x, norm, per_frame, silu=True, pad_frames=conv.time_pad), time_padded=True)


class Resnet3DBlock(nn.Module):
    """GN+SiLU -> causal conv -> GN+SiLU -> causal conv, plus the input (1x1x1 `nin_shortcut` if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, per_frame: bool):
        super().__init__()
        self.per_frame = per_frame
        self.norm1 = nn.GroupNorm(NUM_GROUPS, in_channels)
        self.conv1 = CausalConv(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(NUM_GROUPS, out_channels)
        self.conv2 = CausalConv(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = norm_silu_conv(x, self.norm1, self.per_frame, self.conv1)
        h = norm_silu_conv(h, self.norm2, self.per_frame, self.conv2)
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all t*h*w positions, causal in raster (frame, row, column) order."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.per_frame = per_frame
        self.norm = nn.GroupNorm(NUM_GROUPS, channels)
        self.q = CausalConv(channels, channels, 1)
        self.k = CausalConv(channels, channels, 1)
        self.v = CausalConv(channels, channels, 1)
        self.proj_out = CausalConv(channels, channels, 1)

    @staticmethod
    def _linear(conv: CausalConv, tokens: torch.Tensor) -> torch.Tensor:
        # A 1x1x1 convolution is a linear map of each position's channel vector.
        weight = conv.conv.weight
        return F.linear(tokens, weight.view(weight.shape[0], weight.shape[1]), conv.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        hn = group_norm(x, self.norm, self.per_frame, silu=False)
        tokens = hn.flatten(2).transpose(1, 2)  # (b, t*h*w, c), raster order
        del hn
        q, k, v = (self._linear(m, tokens).unsqueeze(1) for m in (self.q, self.k, self.v))
        del tokens
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        del q, k, v
        out = self._linear(self.proj_out, attn)
        return out.transpose(1, 2).reshape(b, c, t, h, w).add_(x)


class Downsample2D(nn.Module):
    """Per frame: zero pad one row/column at the bottom/right, then a 3x3 stride-2 Conv2d (`.conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        out = x.new_empty((b, self.conv.out_channels, t, h // 2, w // 2))
        kernel = self.conv.weight.unsqueeze(2)  # the 2D kernel applied to every frame: a (1, 3, 3) 3D kernel
        for i, j in frame_blocks(t, b * c * h * w):
            out[:, :, i:j] = F.conv3d(F.pad(x[:, :, i:j], (0, 1, 0, 1)), kernel, self.conv.bias, stride=(1, 2, 2))
        return out


class Downsample3D(nn.Module):
    """Causal 3x3x3 convolution with stride 2 in time, height and width (`.conv.conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, stride=(2, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Per frame: nearest x2 in height and width, then a 3x3 Conv2d (`.conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A block of frames at a time: the upsampled (4x larger) input never exists for the whole clip.
        b, c, t, h, w = x.shape
        out = x.new_empty((b, self.conv.out_channels, t, 2 * h, 2 * w))
        kernel = self.conv.weight.unsqueeze(2)
        for i, j in frame_blocks(t, 4 * b * c * h * w):
            up = F.interpolate(x[:, :, i:j], scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            out[:, :, i:j] = F.conv3d(up, kernel, self.conv.bias, padding=(0, 1, 1))
            del up
        return out


class Res3DBlockUpsample(nn.Module):
    """conv-GN-SiLU-conv-GN, add the input, SiLU, add the input again (equal widths, no third conv)."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.per_frame = per_frame
        self.conv1 = CausalConv(channels, channels, 3)
        self.norm1 = nn.GroupNorm(NUM_GROUPS, channels)
        self.conv2 = CausalConv(channels, channels, 3)
        self.norm2 = nn.GroupNorm(NUM_GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = norm_silu_conv(h, self.norm1, self.per_frame, self.conv2)
        h = group_norm(h, self.norm2, self.per_frame, silu=False)
        h = F.silu(h.add_(x), inplace=True)
        return h.add_(x)


class Upsample3D(nn.Module):
    """Nearest x2 in time, height and width, then `Res3DBlockUpsample` (`.conv3d`)."""

    def __init__(self, channels: int, per_frame: bool):
        super().__init__()
        self.conv3d = Res3DBlockUpsample(channels, per_frame)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---- space/time <-> channel rearrangements of the version-2 heads ---------------------------


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(b, c, t, h, w) -> (b, c*f^3, (t+f-1)/f, h/f, w/f), after f-1 zero frames in front.

    Channel index of the output: c*f^3 + dt*f^2 + dh*f + dw.
    """
    if factor > 1:
        x = F.pad(x, (0, 0, 0, 0, factor - 1, 0))
    b, c, t, h, w = x.shape
    f = factor
    x = x.reshape(b, c, t // f, f, h // f, f, w // f, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * f ** 3, t // f, h // f, w // f)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse layout of `pixel_unshuffle_3d`: (b, c*f^3, t, h, w) -> (b, c, t*f - (f-1), h*f, w*f)."""
    b, c, t, h, w = x.shape
    f = factor
    x = x.reshape(b, c // f ** 3, f, f, f, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, c // f ** 3, t * f, h * f, w * f)
    return x[:, :, f - 1:]


def unshuffle_channel_average(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free shortcut: pixel-unshuffle, then the mean of each run of consecutive channels."""
    x = pixel_unshuffle_3d(x, factor)
    b, c, t, h, w = x.shape
    return x.reshape(b, out_channels, c // out_channels, t, h, w).mean(dim=2)


def duplicate_channels_shuffle(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free shortcut: repeat each channel, then pixel-shuffle to `out_channels`."""
    repeats = out_channels * factor ** 3 // x.shape[1]
    x = x.repeat_interleave(repeats, dim=1)
    return pixel_shuffle_3d(x, factor) if factor > 1 else x


class ConvPatchify(nn.Module):
    """Encoder v2 head: causal conv to out/8 channels, then pixel-unshuffle x2 (`.conv.conv`)."""

    def __init__(self, chan_in: int, chan_out: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(chan_in, chan_out // factor ** 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_3d(self.conv(x), self.factor)


class ConvUnpatchify(nn.Module):
    """Decoder v2 head: causal conv to out*8 channels, then pixel-shuffle x2 (`.conv.conv`)."""

    def __init__(self, chan_in: int, chan_out: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(chan_in, chan_out * factor ** 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), self.factor)
