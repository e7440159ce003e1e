"""Which frames of a video become a training clip (MindSpeed-MM's CogVideoXProcessor rule, with its crashes fixed).

`select_frame_indices` picks source frame indices from the video length and frame rate; `pad_or_truncate` then makes the
clip exactly `num_frames` long by repeating the last frame, or cutting the tail. See docs/data.md for the rule.

Two deviations from MindSpeed-MM, both where it crashes:
- the stride `(end - start) // num_frames` is 0 when the video's fps is below `train_fps`; `np.arange` then raises.
  We use a stride of at least 1 (the clip is shorter than `num_frames` and is padded).
- with `skip_frame_num > 0` the first branch's window can end past the last frame, and MindSpeed-MM indexes past the
  end. We drop those indices (the clip is padded).
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def nearest_smaller_4k_plus_1(n: int) -> int:
    """The largest count of the form 4k+1 that is <= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"no 4k+1 frame count fits in {n} frames.")
    return n - 3 if n % 4 == 0 else n - n % 4 + 1


def select_frame_indices(video_frames: int, fps: float, train_fps: float, num_frames: int,
                         skip_frame_num: int = 0) -> List[int]:
    """Source frame indices (ascending, unique, all < video_frames) for one clip.

    1. The video lasts longer than `num_frames` frames at `train_fps`: a window of `num_frames / train_fps` seconds
       starting at `skip_frame_num`, sampled with stride `(end - start) // num_frames` (at least 1).
    2. Else, if it has more than `num_frames` frames: stride `max((end - start) // num_frames, 1)` over
       `[skip_frame_num, video_frames - skip_frame_num)`.
    3. Else: the largest 4k+1 run of frames that fits in `video_frames - 2 * skip_frame_num`, from `skip_frame_num`.

    The result can be shorter or longer than `num_frames`; `pad_or_truncate` fixes that. A video too short for
    `skip_frame_num` raises ValueError.
    """
    if video_frames <= 0:
        raise ValueError(f"the video has {video_frames} frames.")
    if fps <= 0 or train_fps <= 0 or num_frames <= 0 or skip_frame_num < 0:
        raise ValueError(f"bad frame selection arguments: fps={fps}, train_fps={train_fps}, num_frames={num_frames}, "
                         f"skip_frame_num={skip_frame_num}.")
    start = skip_frame_num
    if video_frames / fps * train_fps > num_frames:
        end = int(start + num_frames / train_fps * fps)
        step = max((end - start) // num_frames, 1)  # MindSpeed-MM: 0 when fps < train_fps, and arange raises
        indices = [i for i in range(start, end, step) if i < video_frames]  # MindSpeed-MM: past the end when skip > 0
    elif video_frames > num_frames:
        end = video_frames - skip_frame_num
        indices = list(range(start, end, max((end - start) // num_frames, 1)))
    else:
        usable = video_frames - 2 * skip_frame_num
        if usable < 1:
            raise ValueError(f"the video has {video_frames} frames, too few to skip {skip_frame_num} at each end "
                             f"(skip_frame_num).")
        indices = list(range(start, start + nearest_smaller_4k_plus_1(usable)))
    if not indices:
        raise ValueError(f"no frames left: the video has {video_frames} frames and skip_frame_num is {skip_frame_num}.")
    return indices


def pad_or_truncate(indices: Sequence[int], num_frames: int) -> List[int]:
    """Exactly `num_frames` indices: the last one repeated at the end, or the tail cut off."""
    indices = list(indices)
    if not indices:
        raise ValueError("cannot pad an empty frame list.")
    if len(indices) >= num_frames:
        return indices[:num_frames]
    return indices + [indices[-1]] * (num_frames - len(indices))


def clip_indices(video_frames: int, fps: float, train_fps: float, num_frames: int,
                 skip_frame_num: int = 0) -> List[int]:
    """`select_frame_indices` followed by `pad_or_truncate`: the `num_frames` source indices of the clip, in order."""
    return pad_or_truncate(select_frame_indices(video_frames, fps, train_fps, num_frames, skip_frame_num), num_frames)


def pad_last_frame(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Frames (T, ...) padded by repeating the last one, or truncated, to exactly `num_frames`."""
    if frames.shape[0] >= num_frames:
        return frames[:num_frames]
    pad = frames[-1:].expand(num_frames - frames.shape[0], *frames.shape[1:])
    return torch.cat([frames, pad], dim=0)
