"""The StepVideo DiT (t2v and i2v) with tensor and Ulysses context parallel (imported on first use)."""

__all__ = ["PretrainedLoadError", "StepVideoDiT"]


def __getattr__(name):
    if name == "StepVideoDiT":
        from .model import StepVideoDiT

        return StepVideoDiT
    if name == "PretrainedLoadError":
        from .pretrained import PretrainedLoadError

        return PretrainedLoadError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
