"""Video reading and writing on real small mp4 files (decord and PyAV, no mocks)."""

import logging
import sys

import numpy as np
import pytest
import torch

from mindspeed_mm.io import video as video_io
from mindspeed_mm.io.video import (DecordVideo, PyAVVideo, VideoReadError, decord_available, open_video,
                                        write_video)

LEVEL0, LEVEL_STEP = 20, 4  # frame i is a flat grey of level 20 + 4 i (decodes within about 1.5 of it)


def level_frames(n, height=32, width=64, marker=True):
    """uint8 (n, H, W, 3): frame i is grey level 20 + 4 i, with a red bar in the left 8 columns (to check layout)."""
    levels = LEVEL0 + LEVEL_STEP * np.arange(n)
    frames = np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).astype(np.uint8).copy()
    if marker:
        frames[:, :, :8] = (250, 10, 10)
    return frames


def make_video(path, n=48, fps=24, height=32, width=64):
    write_video(str(path), level_frames(n, height, width), fps, crf=10)
    return str(path)


def frame_ids(frames):
    """The frame index each decoded (T, H, W, 3) frame encodes, read from its grey part."""
    levels = frames[:, :, 16:].float().mean(dim=(1, 2, 3))
    return [round(v) for v in ((levels - LEVEL0) / LEVEL_STEP).tolist()]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("vid") / "clip.mp4", n=48, fps=24)


def test_pyav_reads_frames_in_order(video):
    reader = PyAVVideo(video)
    assert reader.num_frames == 48 and reader.fps == pytest.approx(24)
    frames = reader.get_frames([0, 1, 2, 47, 5, 5])
    assert frames.dtype == torch.uint8 and frames.shape == (6, 32, 64, 3)
    assert frame_ids(frames) == [0, 1, 2, 47, 5, 5]
    levels = frames[:, :, 16:].float().mean(dim=(1, 2, 3))
    expected = torch.tensor([0, 1, 2, 47, 5, 5]) * LEVEL_STEP + LEVEL0
    assert torch.allclose(levels, expected.float(), atol=1.5)
    red = frames[0, :, :6].float().mean(dim=(0, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # RGB order, channels last


@pytest.mark.skipif(not decord_available(), reason="decord is not importable")
def test_decord_and_pyav_give_the_same_frames(video):
    dec, pav = DecordVideo(video), PyAVVideo(video)
    assert (dec.num_frames, dec.fps) == (pav.num_frames, pav.fps)
    idx = [0, 3, 10, 11, 30, 47]
    a, b = dec.get_frames(idx), pav.get_frames(idx)
    assert a.shape == b.shape == (6, 32, 64, 3) and a.dtype == b.dtype == torch.uint8
    assert (a.int() - b.int()).abs().max() <= 2  # same decoder (ffmpeg); allow a colour-conversion rounding
    assert frame_ids(a) == idx


@pytest.mark.skipif(not decord_available(), reason="decord is not importable")
def test_decord_bad_width_falls_back_to_pyav(tmp_path, caplog):
    # decord 0.6 mis-copies 48-px-wide frames; the reader must still return correct frames.
    path = make_video(tmp_path / "w48.mp4", n=12, height=32, width=48)
    with caplog.at_level(logging.WARNING):
        frames = DecordVideo(path).get_frames([0, 7, 11])
    assert frames.shape == (3, 32, 48, 3)
    assert frame_ids(frames) == [0, 7, 11]
    assert "w48.mp4: decord failed to decode frames" in caplog.text


def test_open_video_falls_back_when_decord_is_missing(video, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError, as on aarch64
    monkeypatch.setattr(video_io, "_decord_notice_logged", False)
    with caplog.at_level(logging.WARNING):
        reader = open_video(video, "DecordVideo")
    assert isinstance(reader, PyAVVideo)
    assert "decord is not importable" in caplog.text
    assert isinstance(open_video(video, "PyAVVideo"), PyAVVideo)
    with pytest.raises(ValueError, match="video_reader_type 'Decord'"):
        open_video(video, "Decord")


@pytest.mark.parametrize("reader", ["PyAVVideo", "DecordVideo"])
def test_errors_name_the_file(tmp_path, video, reader):
    if reader == "DecordVideo" and not decord_available():
        pytest.skip("decord is not importable")
    cls = {"PyAVVideo": PyAVVideo, "DecordVideo": DecordVideo}[reader]
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="garbage.mp4"):
        cls(str(garbage))
    with pytest.raises(VideoReadError, match="missing.mp4: no such video file"):
        cls(str(tmp_path / "missing.mp4"))
    with pytest.raises(VideoReadError, match=r"clip.mp4: frame indices \[48\] are outside"):
        cls(video).get_frames([1, 48])


@pytest.mark.parametrize("reader", ["PyAVVideo", "DecordVideo"])
def test_truncated_video_is_an_error_naming_the_file(tmp_path, reader):
    if reader == "DecordVideo" and not decord_available():
        pytest.skip("decord is not importable")
    path = make_video(tmp_path / "cut.mp4", n=40)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match="cut.mp4"):
        open_video(path, reader).get_frames(list(range(40)))


def test_write_video_checks_its_input(tmp_path):
    path = str(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="even frame size"):
        write_video(path, np.zeros((2, 31, 64, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(path, np.zeros((2, 32, 64, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(path, np.zeros((2, 3, 32, 64), np.uint8), 8)
    write_video(path, torch.zeros(3, 32, 64, 3, dtype=torch.uint8), 30000 / 1001)
    reader = PyAVVideo(path)
    assert reader.num_frames == 3 and reader.fps == pytest.approx(29.97, abs=0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]  # no temporary file left behind
