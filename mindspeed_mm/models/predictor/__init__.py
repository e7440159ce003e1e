"""Diffusion transformers (the StepVideo DiT)."""

from .stepvideo import PretrainedLoadError, StepVideoDiT

__all__ = ["PretrainedLoadError", "StepVideoDiT"]
