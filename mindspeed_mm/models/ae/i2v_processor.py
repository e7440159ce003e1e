"""The i2v image condition: the first frame, lightly noised in training, encoded as a one-frame video.

    image_latents = StepVideoI2VProcessor()(vae, video, latent_frames)   # (b, t, z, h, w)

Latent frame 0 holds the VAE latent of the first video frame (a one-frame video encodes to one
latent); every later latent frame is zero. In training (and feature extraction) the frame first gets
pixel noise `ε · exp(N(-3, 0.5))`, one noise level per sample, as in MindSpeed-MM's processor; at
inference the image is encoded clean. MindSpeed-MM repeats the encoded latents `b` more times
(`.repeat(b, ...)`), which is wrong for b > 1; here each sample keeps its own first frame.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..registry import register_model


@register_model("stepvideo_i2v_processor")
class StepVideoI2VProcessor:
    def __init__(self, noise_log_mean: float = -3.0, noise_log_std: float = 0.5):
        self.noise_log_mean = noise_log_mean
        self.noise_log_std = noise_log_std

    def noise_first_frame(self, frame: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """frame (b, 1, 3, H, W) + ε·σ with σ = exp(N(mean, std)) drawn once per sample."""
        b = frame.shape[0]
        log_sigma = torch.randn(b, generator=generator) * self.noise_log_std + self.noise_log_mean
        sigma = log_sigma.exp().to(frame.device, frame.dtype).view(b, 1, 1, 1, 1)
        noise = torch.randn(frame.shape, generator=generator).to(frame.device, frame.dtype)
        return frame + noise * sigma

    def __call__(self, vae, video: torch.Tensor, latent_frames: int, add_noise: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Condition latents (b, latent_frames, z, h, w) from the first frame of `video` (b, T, 3, H, W)."""
        if video.dim() != 5:
            raise ValueError(f"the i2v processor takes videos (b, T, 3, H, W) (or one image as T = 1), "
                             f"got shape {tuple(video.shape)}.")
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be at least 1, got {latent_frames}.")
        first = video[:, :1]
        if add_noise:
            first = self.noise_first_frame(first, generator)
        latent = vae.encode(first, generator=generator)  # (b, 1, z, h, w): one frame -> one latent
        return self.pad(latent, latent_frames)

    @staticmethod
    def pad(latent: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """The first frame's latent (b, 1, z, h, w) followed by zero latent frames: (b, latent_frames, z, h, w)."""
        rest = torch.zeros((latent.shape[0], latent_frames - 1, *latent.shape[2:]), dtype=latent.dtype,
                           device=latent.device)
        return torch.cat([latent, rest], dim=1)
