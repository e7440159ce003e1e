"""The data pipeline: manifests, video reading, frame selection, transforms, datasets and the resumable sampler.

See docs/data.md.
"""

from .datasets import (BadSampleError, BatchError, FeatureDataset, VideoTextDataset, build_dataset, build_tokenizers,
                       collate, summarize_skipped)
from .frame_sampling import (clip_indices, nearest_smaller_4k_plus_1, pad_last_frame, pad_or_truncate,
                             select_frame_indices)
from .manifest import Manifest, ManifestError, ManifestRow, choose_caption, read_manifest
from .sampler import ResumableDistributedSampler, build_dataloader
from .transforms import center_crop, cover_size, normalize, preprocess_frames, resize_uint8
from ..io.video import (READER_TYPES, DecordVideo, PyAVVideo, VideoReadError, decord_available, open_video,
                       write_video)

__all__ = [
    "BadSampleError", "BatchError", "FeatureDataset", "VideoTextDataset", "build_dataset", "build_tokenizers",
    "collate", "summarize_skipped",
    "clip_indices", "nearest_smaller_4k_plus_1", "pad_last_frame", "pad_or_truncate", "select_frame_indices",
    "Manifest", "ManifestError", "ManifestRow", "choose_caption", "read_manifest",
    "ResumableDistributedSampler", "build_dataloader",
    "center_crop", "cover_size", "normalize", "preprocess_frames", "resize_uint8",
    "READER_TYPES", "DecordVideo", "PyAVVideo", "VideoReadError", "decord_available", "open_video", "write_video",
]
