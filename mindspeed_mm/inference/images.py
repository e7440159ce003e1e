"""The i2v first image: read it, resize it to cover the target size, center-crop, map to [-1, 1].

    frame = load_image("cat.png")                      # uint8 (H, W, 3), RGB
    video = image_to_video(frame, 544, 992)            # float32 (1, 1, 3, 544, 992) in [-1, 1]

Images are decoded with PyAV (FFmpeg), which the project already needs for videos; Pillow and
torchvision are not dependencies. PNG, JPEG, BMP, WebP, TIFF and GIF (first frame) work; an alpha
channel is dropped, as Pillow's `convert("RGB")` does.

The geometry is the official one (Step-Video-TI2V `resize_to_desired_aspect_ratio`, which
MindSpeed-MM copies): the image is mapped to [-1, 1] first (`ToTensor() * 2 - 1`), scaled by the
limiting side so it covers H x W, with `int(round(side * scale))` (Python rounding), resized
bilinearly with antialiasing (torchvision's tensor `Resize` default), and cropped with the offsets
`(scaled - target) // 2`.
"""

from __future__ import annotations

import os
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from ..errors import MindSpeedMMError

ImageLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class ImageReadError(MindSpeedMMError, ValueError):
    """An image file that cannot be decoded; the message names the file."""


class ImageNotFoundError(MindSpeedMMError, FileNotFoundError):
    """An image path that does not exist."""


def load_image(path) -> torch.Tensor:
    """Decode the image at `path` to uint8 RGB (H, W, 3)."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageNotFoundError(f"{path}: no such image file; check the image list (the model JSON's 'image').")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageReadError(f"{path}: the file holds no image.")
            frame = next(container.decode(video=0), None)
            if frame is None:
                raise ImageReadError(f"{path}: the file holds no decodable image.")
            array = frame.to_ndarray(format="rgb24")
    except ImageReadError:
        raise
    except Exception as exc:  # av.error.* (not an image, truncated, unknown format)
        raise ImageReadError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc}).") from exc
    return torch.from_numpy(np.ascontiguousarray(array))


def cover_crop_geometry(height: int, width: int, target_height: int, target_width: int
                        ) -> Tuple[int, int, int, int]:
    """(scaled_h, scaled_w, top, left): the official resize-to-cover and center-crop offsets."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} is empty.")
    if width / height < target_width / target_height:  # narrower than the target: the width limits
        scale = target_width / width
    else:
        scale = target_height / height
    scaled_w, scaled_h = int(round(width * scale)), int(round(height * scale))
    # Rounding can leave the scaled side one pixel short only in pathological float cases; never crop past it.
    scaled_w, scaled_h = max(scaled_w, target_width), max(scaled_h, target_height)
    return scaled_h, scaled_w, (scaled_h - target_height) // 2, (scaled_w - target_width) // 2


def _as_uint8_hwc(image: ImageLike) -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    tensor = torch.as_tensor(np.asarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[-1] != 3 \
            or tensor.dtype != torch.uint8:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(image).__name__
        raise ValueError(f"an image must be a file path or uint8 RGB (H, W, 3), got {shape}.")
    return tensor


def image_to_video(image: ImageLike, height: int, width: int) -> torch.Tensor:
    """A path or uint8 (H, W, 3) image -> float32 (1, 1, 3, height, width) in [-1, 1], as the official pipeline."""
    frame = _as_uint8_hwc(image).permute(2, 0, 1).float().div(255.0).mul(2.0).sub(1.0)  # ToTensor() * 2 - 1
    scaled_h, scaled_w, top, left = cover_crop_geometry(frame.shape[1], frame.shape[2], height, width)
    if (scaled_h, scaled_w) != tuple(frame.shape[1:]):
        frame = F.interpolate(frame[None], size=(scaled_h, scaled_w), mode="bilinear", align_corners=False,
                              antialias=True)[0]
    frame = frame[:, top:top + height, left:left + width]
    return frame.contiguous()[None, None]
