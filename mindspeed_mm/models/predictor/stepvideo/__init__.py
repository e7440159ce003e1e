"""The StepVideo DiT (t2v and i2v) with tensor and Ulysses context parallel."""

from .model import StepVideoDiT
from .pretrained import PretrainedLoadError

__all__ = ["PretrainedLoadError", "StepVideoDiT"]
