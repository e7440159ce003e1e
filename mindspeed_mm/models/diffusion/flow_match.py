"""Flow matching in the convention of the released StepVideo weights, for sampling and training.

Convention (DESIGN.md): x_t = t·x0 + (1 − t)·ε with t ∈ [0, 1], t = 0 is pure noise, and the DiT
predicts the velocity v = x0 − ε. The DiT receives t itself and multiplies it by 1000 inside.

Sampling (the official `FlowMatchDiscreteScheduler`, reproduced to the bit in float32):
    u = linspace(1, 0, N + 1);  t = 1 − s·u / (1 + (s − 1)·u)   (s = shift, 13 in the released pipeline)
    timesteps = t[:-1];  Euler: x ← x + v·(t[i+1] − t[i]), in float32.

Training: t is drawn logit-normally (sigmoid of a standard normal), optionally shifted like the
sampling schedule, and the loss is the per-sample mean squared error to x0 − ε. MindSpeed-MM's
training recipe (t = 0 meaning clean data, t ∈ 0..999 multiplied by 1000 again inside the DiT,
target ε − x0) contradicts the released weights; it is not reproduced here.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...config.base import ConfigError
from ..registry import register_scheduler


def shift_schedule(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift of noise levels u ∈ [0, 1]: s·u / (1 + (s − 1)·u)."""
    return (shift * u) / (1 + (shift - 1) * u)


@register_scheduler("flow_match_discrete_scheduler")
class FlowMatchScheduler:
    """Euler sampling schedule, classifier-free guidance, and the training noise/target/loss."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 13.0, reverse: bool = False,
                 solver: str = "euler", num_inference_timesteps: Optional[int] = None,
                 train_shift: Optional[float] = 13.0):
        if reverse:
            raise ConfigError(
                "diffusion.reverse = true runs the schedule from data to noise, which is not the convention of the "
                "released StepVideo weights (t = 0 is noise, t = 1 is data); set \"reverse\": false."
            )
        if solver != "euler":
            raise ConfigError(f"diffusion.solver {solver!r} is not supported; use \"euler\".")
        if shift <= 0:
            raise ConfigError(f"diffusion.shift {shift} must be positive (13.0 in the released pipeline).")
        if num_train_timesteps < 1:
            raise ConfigError(f"diffusion.num_train_timesteps {num_train_timesteps} must be at least 1.")
        # Kept for the seed's configs; the DiT scales t by 1000 itself, so it does not enter the math.
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.num_inference_timesteps = num_inference_timesteps
        self.train_shift = train_shift
        self.sigmas: Optional[torch.Tensor] = None
        self.timesteps: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, config) -> "FlowMatchScheduler":
        """From the `diffusion` section of the model JSON (`DiffusionConfig`)."""
        return cls(num_train_timesteps=config.num_train_timesteps, shift=config.shift, reverse=config.reverse,
                   solver=config.solver, num_inference_timesteps=config.num_inference_timesteps,
                   train_shift=config.train_shift)

    # ---- sampling ---------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: Optional[int] = None, shift: Optional[float] = None,
                      device=None) -> torch.Tensor:
        """Set `sigmas` (N + 1 values rising from 0 to 1) and `timesteps` (the first N); returns timesteps."""
        steps = num_inference_steps or self.num_inference_timesteps
        if not steps or steps < 1:
            raise ValueError("set the number of sampling steps: diffusion.num_inference_timesteps in the model JSON, "
                             "or num_inference_steps here.")
        u = torch.linspace(1, 0, steps + 1, device=device)
        self.sigmas = 1 - shift_schedule(u, self.shift if shift is None else shift)
        self.timesteps = self.sigmas[:-1]
        return self.timesteps

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from timesteps[index] to the next level, computed (and returned) in float32."""
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps() before step().")
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return sample.to(torch.float32) + velocity.to(torch.float32) * dt

    @staticmethod
    def guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance: uncond + scale·(cond − uncond)."""
        return uncond + scale * (cond - uncond)

    # ---- training ---------------------------------------------------------------------------

    def sample_timesteps(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """t for each sample: sigmoid(N(0, 1)) noise levels, shifted by `train_shift` when set, as 1 − level."""
        noise_level = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
        if self.train_shift is not None:
            noise_level = shift_schedule(noise_level, self.train_shift)
        return 1 - noise_level

    @staticmethod
    def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = t·x0 + (1 − t)·ε, with t (b,) broadcast over the other axes."""
        tt = self._expand(t, x0)
        return tt * x0 + (1 - tt) * noise

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x0 - noise

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor, reduce_dims: Optional[Sequence[int]] = None
             ) -> torch.Tensor:
        """Per-sample mean squared error in float32, shape (b,)."""
        diff = (prediction.float() - target.float()) ** 2
        dims = tuple(reduce_dims) if reduce_dims is not None else tuple(range(1, diff.dim()))
        return diff.mean(dim=dims)
