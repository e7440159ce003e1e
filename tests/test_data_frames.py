"""Frame selection (MindSpeed-MM's three branches, padding, the two crash cases) and the frame transforms."""

import numpy as np
import pytest
import torch

from mindspeed_mm.data.frame_sampling import (clip_indices, nearest_smaller_4k_plus_1, pad_last_frame,
                                              pad_or_truncate, select_frame_indices)
from mindspeed_mm.data.transforms import center_crop, cover_size, normalize, preprocess_frames, resize_uint8


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 1), (4, 1), (5, 5), (8, 5), (9, 9), (10, 9), (12, 9), (13, 13)])
def test_nearest_smaller_4k_plus_1(n, expected):
    assert nearest_smaller_4k_plus_1(n) == expected


def test_branch1_window_of_num_frames_at_train_fps():
    # 100 frames at 24 fps = 33 frames at 8 fps > 8: a 1 s window (24 source frames), stride 3.
    assert select_frame_indices(100, 24, 8, 8, 0) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert select_frame_indices(100, 24, 8, 8, 3) == [3, 6, 9, 12, 15, 18, 21, 24]
    # 136 frames at train_fps 8 from a 30 fps source: stride (510 // 136) = 3 over [0, 510).
    idx = select_frame_indices(600, 30, 8, 136, 0)
    assert idx == list(range(0, 510, 3)) and len(idx) == 170
    assert clip_indices(600, 30, 8, 136, 0) == list(range(0, 408, 3))


def test_branch2_uniform_stride_over_the_video():
    # 40 frames at 24 fps = 13.3 frames at 8 fps <= 16, but 40 > 16: stride 40 // 16 = 2, then truncation.
    assert select_frame_indices(40, 24, 8, 16, 0) == list(range(0, 40, 2))
    assert clip_indices(40, 24, 8, 16, 0) == list(range(0, 32, 2))
    # with skip 1: [1, 29), stride max(28 // 16, 1) = 1
    assert select_frame_indices(30, 24, 8, 16, 1) == list(range(1, 29))


def test_branch3_largest_4k_plus_1_and_padding():
    assert select_frame_indices(12, 8, 8, 16, 1) == list(range(1, 10))  # 10 usable -> 9 frames
    assert clip_indices(12, 8, 8, 16, 1) == list(range(1, 10)) + [9] * 7
    assert select_frame_indices(16, 8, 8, 16, 0) == list(range(13))
    assert select_frame_indices(3, 8, 8, 16, 1) == [1]


def test_fps_below_train_fps_does_not_crash():
    # MindSpeed-MM: end - start = 16 / 8 * 4 = 8 source frames, stride 8 // 16 = 0, and np.arange raises.
    video_frames, fps, train_fps, n = 100, 4, 8, 16
    end = int(0 + n / train_fps * fps)
    assert (end - 0) // n == 0
    with pytest.raises(ZeroDivisionError):
        np.arange(0, end, (end - 0) // n)
    assert select_frame_indices(video_frames, fps, train_fps, n, 0) == list(range(8))
    assert clip_indices(video_frames, fps, train_fps, n, 0) == list(range(8)) + [7] * 8


def test_skip_frame_num_window_past_the_end_is_cut():
    # 30 frames at 8 fps > 24: window [10, 34) runs past frame 29; MindSpeed-MM indexes frames 30..33.
    assert int(10 + 24 / 8 * 8) == 34
    assert select_frame_indices(30, 8, 8, 24, 10) == list(range(10, 30))
    assert clip_indices(30, 8, 8, 24, 10) == list(range(10, 30)) + [29] * 4


def test_videos_too_short_for_the_skip_are_errors():
    with pytest.raises(ValueError, match="too few to skip 3"):
        select_frame_indices(5, 8, 8, 16, 3)
    with pytest.raises(ValueError, match="no frames left"):
        select_frame_indices(30, 24, 8, 16, 20)
    with pytest.raises(ValueError, match="has 0 frames"):
        select_frame_indices(0, 24, 8, 16, 0)


def test_pad_and_truncate():
    assert pad_or_truncate([4, 5], 5) == [4, 5, 5, 5, 5]
    assert pad_or_truncate(range(10), 3) == [0, 1, 2]
    frames = torch.arange(3).view(3, 1, 1).expand(3, 2, 2)
    padded = pad_last_frame(frames, 5)
    assert padded.shape == (5, 2, 2) and padded[:, 0, 0].tolist() == [0, 1, 2, 2, 2]
    assert pad_last_frame(frames, 2)[:, 0, 0].tolist() == [0, 1]


def test_cover_size():
    assert cover_size(32, 64, 16, 24) == (16, 32)  # wider than the target: height fits
    assert cover_size(64, 32, 16, 24) == (48, 24)  # taller: width fits
    assert cover_size(48, 72, 16, 24) == (16, 24)  # same aspect
    assert cover_size(720, 1280, 544, 992) == (558, 992)
    assert cover_size(1080, 1920, 480, 480) == (480, 853)


def test_center_crop_offsets_round_half_to_even():
    x = torch.arange(10 * 11).view(10, 11)
    out = center_crop(x, 4, 4)
    assert out[0, 0].item() == x[3, 4].item()  # top round(3.0) = 3, left round(3.5) = 4
    y = torch.arange(9 * 9).view(9, 9)
    assert center_crop(y, 4, 4)[0, 0].item() == y[2, 2].item()  # round(2.5) = 2
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(y, 10, 4)


def _cubic_weights(t, a=-0.75):
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_reference(img, out_h, out_w):
    """Separable bicubic (A = -0.75, half-pixel centres, edge clamping) in float64: an independent reference."""

    def along(arr, out_size, axis):
        size = arr.shape[axis]
        scale = size / out_size
        result = []
        for d in range(out_size):
            src = scale * (d + 0.5) - 0.5
            base = int(np.floor(src))
            w = _cubic_weights(src - base)
            taps = [np.take(arr, min(max(base - 1 + k, 0), size - 1), axis=axis) for k in range(4)]
            result.append(sum(wk * tk for wk, tk in zip(w, taps)))
        return np.stack(result, axis=axis)

    return along(along(img.astype(np.float64), out_h, 0), out_w, 1)


@pytest.mark.parametrize("out_size", [(9, 4), (5, 13), (3, 3)])
def test_resize_matches_an_independent_bicubic(out_size):
    img = np.random.default_rng(0).integers(0, 256, size=(6, 7)).astype(np.uint8)
    ref = np.clip(np.round(_bicubic_reference(img, *out_size)), 0, 255)
    out = resize_uint8(torch.from_numpy(img).view(1, 1, 6, 7), out_size)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, *out_size)
    diff = np.abs(out[0, 0].numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.9


def test_resize_clamps_overshoot_and_works_in_chunks():
    board = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2 * 255
    frames = board.to(torch.uint8).expand(5, 3, 8, 8).contiguous()
    big = frames.float()
    expected = torch.nn.functional.interpolate(big, size=(13, 11), mode="bicubic", align_corners=False)
    assert expected.min() < 0 and expected.max() > 255  # bicubic overshoots on a checkerboard
    out = resize_uint8(frames, (13, 11), chunk=2)
    assert torch.equal(out, expected.clamp(0, 255).round().to(torch.uint8))


def test_preprocess_geometry_layout_and_range():
    frames = torch.zeros(2, 32, 64, 3, dtype=torch.uint8)
    frames[:, :, :32] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # left half red
    frames[:, :, 32:] = torch.tensor([0, 0, 255], dtype=torch.uint8)  # right half blue
    out = preprocess_frames(frames, 16, 16)  # cover (16, 32), then the central 16 columns
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out[0, 0, 8, 0] == 1 and out[0, 2, 8, 0] == -1  # red at the left edge
    assert out[0, 2, 8, 15] == 1 and out[0, 0, 8, 15] == -1  # blue at the right edge
    grey = preprocess_frames(torch.full((1, 20, 30, 3), 100, dtype=torch.uint8), 8, 8)
    assert torch.equal(grey, torch.full((1, 3, 8, 8), (100 - 127.5) / 127.5))
    assert normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
