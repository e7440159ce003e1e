"""Feature extraction: VAE latents and text-encoder states for training on features."""
