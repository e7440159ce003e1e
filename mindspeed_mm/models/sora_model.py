"""SoRAModel: a batch in, the per-sample flow-matching loss out (pretraining and, with pairs, DPO).

    loss = model(batch, generator)     # (b,) float32

A batch is what `mindspeed_mm.data.collate` makes, either from extracted features
(`load_video_features` / `load_text_features`: "video" holds VAE latents (b, t, z, h, w) and
"prompt_ids" the encoders' states) or from raw videos (pixels (b, T, 3, H, W) in [-1, 1] and token ids),
which are encoded here by the frozen VAE and text encoders.

The loss follows the released weights' convention (DESIGN.md): t ~ logit-normal, x_t = t·x0 + (1 − t)·ε,
the DiT predicts v = x0 − ε, and the loss is the per-sample mean squared error. `generator` draws t, ε
and the i2v pixel noise; it must be seeded identically on the tensor- and context-parallel ranks that
share a batch (the trainer seeds it from the seed, the data-parallel rank and the iteration).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from .ae import StepVideoI2VProcessor, StepVideoVAE
from .diffusion import FlowMatchScheduler
from .predictor import StepVideoDiT
from .text_encoder import StepVideoTextEncoder


class Frozen:
    """A frozen module held outside `nn.Module`'s registry.

    Assigning a module to an attribute of a module registers it (a leading underscore does not prevent that), and
    then `parameters()`, `state_dict()`, `.train()`, `requires_grad_()`, DDP and the optimizer all see it. Held in
    this box it stays out of all of them: it is put in eval mode with gradients off once, here, and nothing done to
    the training module reaches it.
    """

    __slots__ = ("module",)

    def __init__(self, module: Optional[torch.nn.Module]):
        self.module = None if module is None else module.eval().requires_grad_(False)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class SoRAModel(MegatronModule):
    """The trainable DiT plus, when the data are raw videos, the frozen VAE and text encoders."""

    def __init__(self, predictor: StepVideoDiT, scheduler: FlowMatchScheduler, vae: Optional[StepVideoVAE] = None,
                 text_encoder: Optional[StepVideoTextEncoder] = None, i2v: bool = False,
                 motion_score: float = 5.0):
        super().__init__(predictor.config)
        self.predictor = predictor
        self.scheduler = scheduler
        # The frozen encoders stay out of the module tree: DDP, the optimizer and checkpoints see the DiT only.
        self._vae = Frozen(vae)
        self._text_encoder = Frozen(text_encoder)
        self.i2v = i2v
        self.motion_score = motion_score
        # {name: JSON-able dict} saved beside every checkpoint (e.g. the DPO reference); see training/checkpointing.py
        self.checkpoint_records: Dict[str, dict] = {}
        self.i2v_processor = StepVideoI2VProcessor() if i2v else None

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        # The checkpoint holds the DiT under its own names (no "predictor." prefix), as MindSpeed-MM does.
        return self.predictor.state_dict(prefix=prefix, keep_vars=keep_vars)

    # ---- inputs -----------------------------------------------------------------------------

    @property
    def encodes_videos(self) -> bool:
        """True when batches hold pixels that the frozen VAE encodes here (load_video_features false)."""
        return self._vae.module is not None

    def _latents(self, batch: Dict, generator: Optional[torch.Generator]
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        video = batch["video"]
        device = self.predictor.device
        vae = self._vae.module
        if vae is not None:  # raw videos: pixels (b, T, 3, H, W) in [-1, 1]
            if video.dim() != 5 or video.shape[2] != 3:
                raise ValueError(f"batch['video'] must be pixels (b, T, 3, H, W) when the model encodes videos "
                                 f"(load_video_features false); got shape {tuple(video.shape)}.")
            with torch.no_grad():
                pixels = video.to(device)
                latents = vae.encode(pixels, generator=generator)
                cond = None
                if self.i2v:
                    cond = self.i2v_processor(vae, pixels, latents.shape[1], generator=generator)
            return latents, cond
        if video.dim() != 5:
            raise ValueError(f"batch['video'] must be latents (b, t, z, h, w) with load_video_features true; got "
                             f"shape {tuple(video.shape)}.")
        cond = batch.get("image_latents")
        if self.i2v and cond is None:
            raise ValueError("this is an i2v model but the batch has no 'image_latents'; extract features with the i2v "
                             "launcher (feature_extraction_i2v.sh) or train on raw videos.")
        return video.to(device), None if cond is None else cond.to(device)

    def _prompt(self, batch: Dict) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        ids, masks = list(batch["prompt_ids"]), list(batch["prompt_mask"])
        device = self.predictor.device
        if ids[0].dim() == 2 and not ids[0].is_floating_point():  # token ids: encode them here
            if self._text_encoder.module is None:
                raise ValueError("the batch holds token ids but the model has no text encoder; set "
                                 "load_text_features false in the model JSON (with a text_encoder section), or train "
                                 "on extracted features.")
            return self._text_encoder.module.encode_tokens(ids, masks)
        return [t.to(device) for t in ids], [m.to(device) for m in masks]

    # ---- loss -------------------------------------------------------------------------------

    def forward(self, batch: Dict, generator: Optional[torch.Generator] = None, t: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample loss (b,). `t` and `noise` are drawn from `generator` unless given (DPO shares them)."""
        x0, cond = self._latents(batch, generator)
        prompt, prompt_mask = self._prompt(batch)
        if t is None:
            t = self.scheduler.sample_timesteps(x0.shape[0], generator=generator)
        # The DiT sees t in its own dtype (bf16 rounds it); x_t uses the same rounded value.
        t = t.to(self.predictor.dtype).float().to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        noise = noise.to(x0.device, torch.float32)
        x0 = x0.float()
        x_t = self.scheduler.add_noise(x0, noise, t)
        extra = {"image_latents": cond, "motion_score": self.motion_score} if self.i2v else {}
        prediction = self.predictor(x_t, t, prompt, prompt_mask, **extra)
        return self.scheduler.loss(prediction, self.scheduler.velocity_target(x0, noise))
