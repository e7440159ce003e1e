"""Spatial tiling with overlap and linear blending, for bounded-memory VAE encode and decode.

`tiled_apply(x, fn, tile, overlap, scale)` cuts the last two (height, width) axes of `x` into
`tile`-sized windows that overlap by at least `overlap`, runs `fn` on each window, and blends
the outputs: each output tile is weighted by a ramp that rises linearly across its overlap
with a neighbour (and is flat at the image border), and the weighted sum is divided by the sum
of weights. `fn` must map a window of size (h, w) to one of size (h*scale, w*scale) that is
spatially aligned with it, as the VAE encoder (scale 1/16) and decoder (scale 16) are.

Windows start every `tile - overlap` positions; the last one is moved back to end at the
border, so every window has the full tile size (and may overlap its neighbour by more).
A dimension no larger than `tile` is a single window, so an input that fits in one tile goes
through `fn` unchanged: tiling then gives bitwise the untiled result.

Peak memory is that of `fn` on one tile plus the float32 output canvas.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, List, Tuple

import torch


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of the windows covering [0, size) with windows of `tile` overlapping by >= `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def ramp_weights(starts: List[int], index: int, length: int, scale: Fraction) -> torch.Tensor:
    """Blend weights (in output units) of window `index` along one axis.

    Linear from 0 to 1 across the overlap with the previous window and from 1 to 0 across the
    overlap with the next one; 1 elsewhere, including at the image borders.
    """
    n_out = int(length * scale)
    pos = torch.arange(n_out, dtype=torch.float64) + 0.5
    weight = torch.ones(n_out, dtype=torch.float64)
    start = starts[index]
    if index > 0:
        left = int((starts[index - 1] + length - start) * scale)
        if left > 0:
            weight = weight * (pos / left).clamp(max=1.0)
    if index + 1 < len(starts):
        right = int((start + length - starts[index + 1]) * scale)
        if right > 0:
            weight = weight * ((n_out - pos) / right).clamp(max=1.0)
    return weight.float()


def tile_grid(height: int, width: int, tile: int, overlap: int) -> Tuple[List[int], List[int]]:
    return tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int,
                scale: Fraction) -> torch.Tensor:
    """Apply `fn` window by window over the last two axes of `x` and blend (see the module docstring)."""
    height, width = x.shape[-2:]
    ys, xs = tile_grid(height, width, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    th, tw = min(tile, height), min(tile, width)
    out = weight_sum = None
    for iy, y0 in enumerate(ys):
        wy = ramp_weights(ys, iy, th, scale).to(x.device)
        for ix, x0 in enumerate(xs):
            wx = ramp_weights(xs, ix, tw, scale).to(x.device)
            piece = fn(x[..., y0:y0 + th, x0:x0 + tw])
            if out is None:
                lead = piece.shape[:-2]
                out = torch.zeros((*lead, int(height * scale), int(width * scale)), dtype=torch.float32,
                                  device=piece.device)
                weight_sum = torch.zeros(out.shape[-2:], dtype=torch.float32, device=piece.device)
            oy, ox = int(y0 * scale), int(x0 * scale)
            w2 = wy[:, None] * wx[None, :]
            region = (..., slice(oy, oy + piece.shape[-2]), slice(ox, ox + piece.shape[-1]))
            out[region] += piece.float() * w2
            weight_sum[oy:oy + piece.shape[-2], ox:ox + piece.shape[-1]] += w2
            del piece
    return out.div_(weight_sum).to(x.dtype)
