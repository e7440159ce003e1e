"""The StepVideo Video-VAE (v2 and v1) and the i2v image-condition processor."""

from .checkpoint import VAEWeightsError, infer_config
from .i2v_processor import StepVideoI2VProcessor
from .stepvideo_vae import StepVideoVAE, VAEConfigError, VAEInputError

__all__ = ["StepVideoI2VProcessor", "StepVideoVAE", "VAEConfigError", "VAEInputError", "VAEWeightsError",
           "infer_config"]
