"""The inference pipeline's configuration error, raised by the pipeline and by `magic_strings`."""

from __future__ import annotations

from ..errors import MindSpeedMMError


class InferenceConfigError(MindSpeedMMError, ValueError):
    """Pipeline settings that cannot work together; the message names the config key and the fix."""
