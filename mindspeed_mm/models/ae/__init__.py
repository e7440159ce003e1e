"""The StepVideo Video-VAE (v2 and v1)."""

from .checkpoint import VAEWeightsError, infer_config
from .stepvideo_vae import StepVideoVAE, VAEConfigError, VAEInputError

__all__ = ["StepVideoVAE", "VAEConfigError", "VAEInputError", "VAEWeightsError", "infer_config"]
