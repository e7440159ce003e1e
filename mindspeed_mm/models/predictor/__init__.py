"""Diffusion transformers (the StepVideo DiT).

`StepVideoDiT` is imported on first use: the model pulls in Megatron-core (seconds to import), which
the checkpoint converter and other light tools that only need the key mapping do not want.
"""

__all__ = ["PretrainedLoadError", "StepVideoDiT"]


def __getattr__(name):
    if name in __all__:
        from . import stepvideo

        return getattr(stepvideo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
