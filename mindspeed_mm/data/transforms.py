"""Frame transforms of the video pipeline: resize to cover, center crop, normalise to [-1, 1].

Written with `torch.nn.functional.interpolate` (torchvision is not a dependency), reproducing what torchvision's tensor
`resize(..., BICUBIC, antialias=False)` and `center_crop` do to uint8 frames: bicubic with align_corners=False and no
antialias in float32, clamped to [0, 255] and rounded back to uint8; the crop offset is `round((in - out) / 2)` with
Python's round (half to even).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def cover_size(height: int, width: int, max_height: int, max_width: int) -> Tuple[int, int]:
    """The (h, w) a (height, width) frame is resized to so it covers max_height x max_width, aspect kept.

    As MindSpeed-MM: when the frame is wider than the target, the height becomes `max_height` and the width
    `int(width * max_height / height)`; otherwise the width becomes `max_width` and the height
    `int(height * max_width / width)`. The other side is then never below the target (the `max` only guards that).
    """
    if width / height > max_width / max_height:
        return max_height, max(int(width * max_height / height), max_width)
    return max(int(height * max_width / width), max_height), max_width


def resize_uint8(frames: torch.Tensor, size: Tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """Bicubic resize of uint8 frames (T, 3, H, W) to `size`, back to uint8 (torchvision's rounding).

    Works `chunk` frames at a time so a long clip of large frames does not need a float copy of all of it at once.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"resize_uint8 takes uint8 frames (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}.")
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out = torch.empty(frames.shape[0], frames.shape[1], *size, dtype=torch.uint8)
    for i in range(0, frames.shape[0], chunk):
        part = F.interpolate(frames[i:i + chunk].float(), size=size, mode="bicubic", align_corners=False,
                             antialias=False)
        out[i:i + chunk] = part.clamp_(0, 255).round_().to(torch.uint8)
    return out


def center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central height x width window of frames (..., H, W); H >= height and W >= width."""
    in_h, in_w = frames.shape[-2:]
    if in_h < height or in_w < width:
        raise ValueError(f"cannot crop {height}x{width} out of {in_h}x{in_w} frames.")
    top = int(round((in_h - height) / 2.0))
    left = int(round((in_w - width) / 2.0))
    return frames[..., top:top + height, left:left + width]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as (x - 127.5) / 127.5."""
    return (frames.float() - 127.5) / 127.5


def preprocess_frames(frames: torch.Tensor, max_height: int, max_width: int) -> torch.Tensor:
    """uint8 frames (T, H, W, 3), as the readers return them, -> float32 (T, 3, max_height, max_width) in [-1, 1].

    Resize (bicubic) to cover the target, center crop, normalise: MindSpeed-MM's CogVideoXProcessor. The crop happens
    after the resize, on uint8, so the output equals resizing whole frames and then cropping.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got {tuple(frames.shape)}.")
    tchw = frames.permute(0, 3, 1, 2)
    size = cover_size(tchw.shape[-2], tchw.shape[-1], max_height, max_width)
    return normalize(center_crop(resize_uint8(tchw.contiguous(), size), max_height, max_width))
