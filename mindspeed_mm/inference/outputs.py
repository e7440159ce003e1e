"""Writing generated videos: `video_{i}.mp4` per video and the `video_grid.mp4` overview.

    frames = to_uint8(decoded)                            # (b, T, 3, H, W) in [-1, 1] -> uint8 (b, T, H, W, 3)
    save_videos(frames, [0, 1], "out/", fps=25)           # out/video_0.mp4, out/video_1.mp4
    write_video_grid(["out/video_0.mp4", ...], "out/video_grid.mp4", fps=25)

`i` is the video's index in the prompt list after each prompt is repeated
`num_inference_videos_per_sample` times (`prompt_index * N + k`), as in MindSpeed-MM, so the DPO scorer
finds the N samples of prompt p at `video_{p*N}` ... `video_{p*N+N-1}`.

The grid is MindSpeed-MM's layout: `nrow = ceil(sqrt(B))` rows, `ncol = ceil(B / nrow)` columns, videos
in index order row by row, 1-px black padding around and between tiles. H.264 in yuv420p needs an even
frame size, so one more black row or column is added at the bottom or right when the size is odd (an
odd size would make MindSpeed-MM's imageio writer resize the grid instead). The grid is streamed frame by
frame from the written files, so it never holds more than one frame of every video in memory.
"""

from __future__ import annotations

import math
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..data import write_video
from ..io.video import encode_frames

GRID_NAME = "video_grid.mp4"
GRID_PADDING = 1


def video_name(index: int) -> str:
    return f"video_{index}.mp4"


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoded video (b, T, 3, H, W), nominally in [-1, 1] -> uint8 (b, T, H, W, 3) on the CPU.

    Clamped to [-1, 1], mapped to [0, 255] and rounded to the nearest level.
    """
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"expected a decoded video (b, T, 3, H, W), got shape {tuple(video.shape)}.")
    out = (video.detach().float().clamp(-1.0, 1.0) + 1.0).mul_(127.5).round_()
    return out.to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous().cpu()


def save_videos(videos: torch.Tensor, indices: Sequence[int], save_path, fps: int) -> List[str]:
    """Write uint8 videos (b, T, H, W, 3) as save_path/video_{indices[k]}.mp4; returns the paths."""
    if len(indices) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(indices)} indices.")
    os.makedirs(save_path, exist_ok=True)
    paths = []
    for index, video in zip(indices, videos):
        paths.append(write_video(os.path.join(save_path, video_name(index)), video, fps=fps))
    return paths


def grid_layout(count: int) -> Tuple[int, int]:
    """(rows, columns) of MindSpeed-MM's grid for `count` videos."""
    if count < 1:
        raise ValueError("a grid needs at least one video.")
    rows = math.ceil(math.sqrt(count))
    return rows, math.ceil(count / rows)


def grid_frame_size(count: int, height: int, width: int, padding: int = GRID_PADDING) -> Tuple[int, int]:
    """(H, W) of the grid frame: the padded tiles, rounded up to even sizes for yuv420p."""
    rows, cols = grid_layout(count)
    grid_h = (padding + height) * rows + padding
    grid_w = (padding + width) * cols + padding
    return grid_h + grid_h % 2, grid_w + grid_w % 2


def tile_origin(index: int, count: int, height: int, width: int, padding: int = GRID_PADDING) -> Tuple[int, int]:
    """Top-left pixel of tile `index` (0-based position in the grid)."""
    _, cols = grid_layout(count)
    row, col = divmod(index, cols)
    return padding + (padding + height) * row, padding + (padding + width) * col


def write_video_grid(paths: Sequence[str], out_path: str, fps: int, crf: int = 17) -> str:
    """Tile the videos at `paths` (same frame size and count) into one H.264 file at `out_path`."""
    import av

    if not paths:
        raise ValueError("write_video_grid needs at least one video.")
    containers = [av.open(os.fspath(p)) for p in paths]
    try:
        streams = [c.streams.video[0] for c in containers]
        height, width = streams[0].codec_context.height, streams[0].codec_context.width
        for p, s in zip(paths, streams):
            if (s.codec_context.height, s.codec_context.width) != (height, width):
                raise ValueError(f"{p}: frame size {s.codec_context.height}x{s.codec_context.width} differs from "
                                 f"{paths[0]}'s {height}x{width}; a grid needs equal sizes.")
        decoders = [c.decode(s) for c, s in zip(containers, streams)]
        grid_h, grid_w = grid_frame_size(len(paths), height, width)
        origins = [tile_origin(i, len(paths), height, width) for i in range(len(paths))]
        canvas = np.zeros((grid_h, grid_w, 3), dtype=np.uint8)

        def grid_frames():
            while True:
                frames = [next(d, None) for d in decoders]
                if all(f is None for f in frames):
                    return
                for (top, left), frame in zip(origins, frames):
                    if frame is None:  # a shorter video: its tile goes black
                        canvas[top:top + height, left:left + width] = 0
                    else:
                        canvas[top:top + height, left:left + width] = frame.to_ndarray(format="rgb24")
                yield canvas

        encode_frames(out_path, grid_frames(), grid_h, grid_w, fps, crf=crf)
    finally:
        for c in containers:
            c.close()
    return out_path
