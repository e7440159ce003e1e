"""Reading and writing media files (videos now), shared by the data pipeline and inference."""

from .video import VideoReadError, decord_available, encode_frames, open_video, write_video

__all__ = ["VideoReadError", "decord_available", "encode_frames", "open_video", "write_video"]
