"""Inference (推理): the StepVideo sampling pipeline, its text conditions, the i2v image input, and
video/grid writing.

See docs/inference.md. `inference_sora.py` at the repository root is the command line.
"""

from .conditions import (NEGATIVE_MAGIC, POSITIVE_MAGIC, TextConditions, conditioning_texts, encode_conditions,
                         magic_strings)
from .errors import InferenceConfigError
from .images import ImageReadError, cover_crop_geometry, image_to_video, load_image
from .outputs import (GRID_NAME, grid_frame_size, grid_layout, save_videos, tile_origin, to_uint8, video_name,
                      write_video_grid)
from .pipeline import DEFAULT_MOTION_SCORE, StepVideoPipeline, make_generator
from .runner import (MAX_PROMPTS, InferenceInputError, InferencePlan, InferenceResult, build_plan, dit_source,
                     read_images, read_prompts, run_inference)

__all__ = [
    "DEFAULT_MOTION_SCORE", "GRID_NAME", "MAX_PROMPTS", "NEGATIVE_MAGIC", "POSITIVE_MAGIC",
    "ImageReadError", "InferenceConfigError", "InferenceInputError", "InferencePlan", "InferenceResult",
    "StepVideoPipeline", "TextConditions",
    "build_plan", "conditioning_texts", "cover_crop_geometry", "dit_source", "encode_conditions", "grid_frame_size",
    "grid_layout", "image_to_video", "load_image", "magic_strings", "make_generator", "read_images", "read_prompts",
    "run_inference", "save_videos", "tile_origin", "to_uint8", "video_name", "write_video_grid",
]
