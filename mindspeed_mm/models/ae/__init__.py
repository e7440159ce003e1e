"""The StepVideo Video-VAE (v2 and v1)."""
