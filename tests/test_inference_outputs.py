"""video_{i}.mp4 and video_grid.mp4: names, frame count, size, fps, grid layout and padding."""

from __future__ import annotations

import torch

from mindspeed_mm.data import open_video
from mindspeed_mm.inference import grid_frame_size, grid_layout, save_videos, tile_origin, write_video_grid

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def _constant_videos(frames=5, height=32, width=48):
    return torch.stack([torch.tensor(c, dtype=torch.uint8).expand(frames, height, width, 3) for c in COLOURS])


def test_grid_layout_is_mindspeed_mm_s():
    assert [grid_layout(n) for n in (1, 2, 3, 4, 5, 10)] == [(1, 1), (2, 1), (2, 2), (2, 2), (3, 2), (4, 3)]
    assert grid_frame_size(1, 32, 32) == (34, 34)
    assert grid_frame_size(3, 32, 48) == (68, 100)        # 2 x 2 tiles: 67 x 99 padded to even sizes
    assert grid_frame_size(4, 544, 992) == (1092, 1988)   # 2 x 2 at the released size: 1091 x 1987 -> even
    assert tile_origin(3, 4, 32, 48) == (34, 50)


def test_videos_and_grid_are_written_and_read_back(tmp_path):
    paths = save_videos(_constant_videos(), [4, 5, 6], tmp_path, fps=12)
    assert [p.split("/")[-1] for p in paths] == ["video_4.mp4", "video_5.mp4", "video_6.mp4"]
    for path, colour in zip(paths, COLOURS):
        with open_video(path, "PyAVVideo") as video:
            assert video.num_frames == 5 and video.fps == 12
            frames = video.get_frames(range(5))
        assert frames.shape == (5, 32, 48, 3)
        assert (frames.int() - torch.tensor(colour)).abs().max() <= 3

    grid_path = write_video_grid(paths, str(tmp_path / "video_grid.mp4"), fps=12)
    with open_video(grid_path, "PyAVVideo") as grid:
        assert grid.num_frames == 5 and grid.fps == 12
        frames = grid.get_frames(range(5)).int()
    assert frames.shape == (5, 68, 100, 3)
    for k, colour in enumerate(COLOURS):  # tiles in index order, row by row
        top, left = tile_origin(k, 3, 32, 48)
        error = (frames[:, top + 3:top + 29, left + 3:left + 45] - torch.tensor(colour)).abs()
        assert error.max() <= 12 and error.float().mean() < 6, k  # two lossy encodes; colours differ by 160
    top, left = tile_origin(3, 3, 32, 48)
    assert frames[:, top + 2:top + 30, left + 2:left + 46].max() <= 4   # no fourth video: black
    assert frames[:, :, 0].float().mean() < 20 and frames[:, 0].float().mean() < 20   # the padding is black
