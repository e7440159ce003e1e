"""Reading and writing videos.

Both readers share one interface:

- `num_frames` (int) and `fps` (float) from the container,
- `get_frames(indices) -> torch.uint8 tensor (T, H, W, 3)`, RGB, channels last (decord's native layout, and the
  layout `write_video` takes). Indices may repeat and come in any order; the output follows them.

`DecordVideo` uses decord (as MindSpeed-MM does). `PyAVVideo` uses PyAV, decoding the stream sequentially from the start
and keeping only the requested frames, so frame i is the i-th decoded frame in presentation order, exactly as decord
counts. `open_video` falls back from decord to PyAV (with one logged notice) where decord is not importable: decord has
no aarch64 wheel. Every error is a `VideoReadError` that names the file.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

READER_TYPES = ("DecordVideo", "PyAVVideo")


class VideoReadError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file."""


def _check_indices(path: str, indices: Sequence[int], num_frames: int) -> list:
    out = [int(i) for i in indices]
    if not out:
        raise VideoReadError(f"{path}: no frame indices requested.")
    bad = [i for i in out if i < 0 or i >= num_frames]
    if bad:
        raise VideoReadError(f"{path}: frame indices {bad[:5]} are outside the video's {num_frames} frames.")
    return out


class PyAVVideo:
    """A video read with PyAV. Decodes sequentially from the first frame; keeps only the frames asked for."""

    def __init__(self, path: str):
        import av

        self.path = path
        if not os.path.isfile(path):
            raise VideoReadError(f"{path}: no such video file.")
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoReadError(f"{path}: the file has no video stream.")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                count = int(stream.frames or 0)
                if count <= 0:  # containers without a frame count in the header (e.g. some mkv/webm)
                    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except VideoReadError:
            raise
        except Exception as exc:  # av.error.* and friends
            raise VideoReadError(f"{path}: PyAV cannot open the video ({type(exc).__name__}: {exc}).") from exc
        if not rate or float(rate) <= 0:
            raise VideoReadError(f"{path}: the video stream has no frame rate.")
        if count <= 0:
            raise VideoReadError(f"{path}: the video has no frames.")
        self.fps = float(rate)
        self.num_frames = count

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        import av

        wanted = _check_indices(self.path, indices, self.num_frames)
        needed = set(wanted)
        last = max(needed)
        got = {}
        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    if i in needed:
                        got[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        except Exception as exc:
            raise VideoReadError(f"{self.path}: PyAV failed while decoding ({type(exc).__name__}: {exc}).") from exc
        missing = sorted(needed - got.keys())
        if missing:
            raise VideoReadError(f"{self.path}: the stream ended before frame {missing[0]} (header says "
                                 f"{self.num_frames} frames, decoded {len(got)} of the {len(needed)} requested).")
        return torch.from_numpy(np.stack([got[i] for i in wanted]))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DecordVideo:
    """A video read with decord (`VideoReader`, CPU context)."""

    def __init__(self, path: str, num_threads: int = 0):
        import decord

        self.path = path
        if not os.path.isfile(path):
            raise VideoReadError(f"{path}: no such video file.")
        try:
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except Exception as exc:  # decord.DECORDError, RuntimeError
            raise VideoReadError(f"{path}: decord cannot open the video ({type(exc).__name__}: {exc}).") from exc
        if self.num_frames <= 0:
            raise VideoReadError(f"{path}: the video has no frames.")
        if self.fps <= 0:
            raise VideoReadError(f"{path}: the video stream has no frame rate.")
        self._fallback: Optional[PyAVVideo] = None

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        wanted = _check_indices(self.path, indices, self.num_frames)
        if self._fallback is not None:
            return self._fallback.get_frames(wanted)
        try:
            frames = self._reader.get_batch(wanted).asnumpy()
        except Exception as exc:
            frames = None
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
        else:
            reason = f"it returned shape {tuple(frames.shape)}"
        if frames is not None and frames.ndim == 4 and frames.shape[0] == len(wanted) and frames.shape[-1] == 3:
            return torch.from_numpy(np.ascontiguousarray(frames))
        # decord 0.6 mis-copies some frame widths (e.g. 48 px: 4 channels, or a size-mismatch error). The file itself
        # is fine, so decode it with PyAV instead of dropping it.
        logger.warning("%s: decord failed to decode frames (%s); decoding this file with PyAV instead.",
                       self.path, reason)
        self._fallback = PyAVVideo(self.path)
        return self._fallback.get_frames(wanted)

    def close(self) -> None:
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_decord_notice_logged = False


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def open_video(path: str, reader_type: str = "DecordVideo"):
    """Open `path` with the reader named by `preprocess_parameters.video_reader_type`.

    "DecordVideo" falls back to PyAV, with one logged notice, when decord is not importable.
    """
    global _decord_notice_logged
    if reader_type not in READER_TYPES:
        raise ValueError(f"video_reader_type {reader_type!r} is not one of {', '.join(READER_TYPES)}.")
    if reader_type == "DecordVideo":
        if decord_available():
            return DecordVideo(path)
        if not _decord_notice_logged:
            logger.warning("video_reader_type is 'DecordVideo' but decord is not importable (it has no aarch64 wheel); "
                           "reading videos with PyAV instead. Set video_reader_type to 'PyAVVideo' to silence this.")
            _decord_notice_logged = True
    return PyAVVideo(path)


def write_video(path: str, frames, fps: float, crf: int = 17, codec: str = "libx264") -> str:
    """Write uint8 RGB frames (T, H, W, 3) (tensor or array) to `path` as H.264 / yuv420p.

    The file is written under a temporary name and renamed, so a reader never sees half a video. H and W must be even
    (yuv420p). `crf` is the x264 quality (0 = lossless luma, 17 = visually lossless, 23 = x264's default).
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: write_video takes frames of shape (T, H, W, 3), got {tuple(frames.shape)}.")
    if frames.dtype != np.uint8:
        raise ValueError(f"{path}: write_video takes uint8 frames, got {frames.dtype}; map [-1, 1] to "
                         f"[0, 255] and round first.")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError(f"{path}: no frames to write.")
    if h % 2 or w % 2:
        raise ValueError(f"{path}: yuv420p needs an even frame size, got {h}x{w}.")
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}.")
    return encode_frames(path, iter(frames), h, w, fps, crf=crf, codec=codec)


def encode_frames(path: str, frames: Iterator[np.ndarray], height: int, width: int, fps: float, crf: int = 17,
                  codec: str = "libx264") -> str:
    """Encode uint8 RGB (height, width, 3) frames from an iterator into `path`, atomically (temporary name, then
    rename; removed on failure). Callers validate sizes; `write_video` is the checked front door."""
    import av

    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.partial{os.path.splitext(name)[1]}")
    try:
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path

