"""Diffusion transformers (the StepVideo DiT)."""
