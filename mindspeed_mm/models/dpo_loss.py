"""DPOLossModel: DPO post-training of the DiT against a frozen reference copy of itself.

    loss, metrics = model(batch, generator)     # per-pair loss (b,)

A batch holds preference pairs: "video" (the winner) and "video_rejected" (the loser), as raw pixels
or extracted latents, one prompt per pair, and "score"/"score_rejected" for the optional pair weights.
Both members of a pair are noised with the same t and the same noise (see `mindspeed_mm/dpo/loss.py`).
The actor runs winner and loser in one batch of 2b; the reference runs them without gradients. Only the
actor is trained and saved.

LoRA-DPO: with `reference=None` the actor must carry LoRA adapters (`models/lora.py`), and the reference is the
actor itself with its adapters switched off, in eval mode and without gradients: the frozen base is the weights the
run started from, so no second DiT is built, loaded or held.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..dpo.loss import dpo_loss
from .diffusion_loss import DiffusionLossModel, Frozen
from .lora import has_lora, lora_disabled


class DPOLossModel(DiffusionLossModel):
    """The actor DiT (trained) against `reference`, a frozen DiT of the same config, or, when `reference` is None,
    against the actor's own base (its LoRA adapters off).

    The trainer decides where the reference comes from (`mindspeed_mm/training/dpo.py`); this module only runs it.
    With `enable_encoder_dp` the pairs are encoded by `DiffusionLossModel.encode_iteration`: winner, then loser.
    """

    # forward encodes the winner, then the loser, each with its own first-frame condition
    video_keys = (("video", "image_latents"), ("video_rejected", "image_latents_rejected"))

    def __init__(self, predictor, scheduler, reference, vae=None, text_encoder=None, i2v: bool = False,
                 loss_beta: float = 2000.0, beta: float = 0.1, label_smoothing: float = 0.0, pref_ftx: float = 0.0,
                 histogram: Optional[dict] = None, weight_alpha: float = 0.0, weight_beta: Optional[float] = None,
                 enable_encoder_dp: bool = False, encoder_group=None, caption_dropout: float = 0.0,
                 empty_prompt=None):
        super().__init__(predictor, scheduler, vae=vae, text_encoder=text_encoder, i2v=i2v,
                         enable_encoder_dp=enable_encoder_dp, encoder_group=encoder_group,
                         caption_dropout=caption_dropout, empty_prompt=empty_prompt)
        if reference is None and not has_lora(predictor):
            raise ValueError("DPOLossModel without a reference DiT needs LoRA adapters on the actor (LoRA-DPO: the "
                             "reference is the actor with its adapters off).")
        # Out of the module tree: DDP, the optimizer, `.train()` and checkpoints see the actor only.
        self._reference = Frozen(reference)
        self.loss_beta, self.beta = loss_beta, beta
        self.label_smoothing, self.pref_ftx = label_smoothing, pref_ftx
        self.histogram, self.weight_alpha, self.weight_beta = histogram, weight_alpha, weight_beta

    @property
    def reference(self):
        return self._reference.module

    def _reference_losses(self, target, *inputs, **extra) -> torch.Tensor:
        with torch.no_grad():
            if self._reference.module is not None:
                return self.scheduler.loss(self._reference(*inputs, **extra), target)
            # LoRA-DPO: the base, as a frozen reference runs (eval mode: no dropout anywhere)
            was_training = self.predictor.training
            self.predictor.eval()
            try:
                with lora_disabled(self.predictor):
                    return self.scheduler.loss(self.predictor(*inputs, **extra), target)
            finally:
                self.predictor.train(was_training)

    def _pair_weights(self, batch: Dict, b: int) -> Optional[torch.Tensor]:
        if not self.weight_alpha:
            return None
        from ..dpo.histogram import pair_weight

        scores_w, scores_l = batch["score"].tolist(), batch["score_rejected"].tolist()
        return torch.tensor([pair_weight(self.histogram, sw, sl, self.weight_alpha, self.weight_beta)
                             for sw, sl in zip(scores_w, scores_l)], dtype=torch.float32)

    def forward(self, batch: Dict, generator: Optional[torch.Generator] = None):
        if "video_rejected" not in batch:
            raise ValueError("a DPO batch needs 'video_rejected': point data_path at the data.jsonl written by "
                             "examples/stepvideo/histgram_generator.py (rows with file and file_rejected).")
        if self.i2v and not self.encodes_videos and "image_latents_rejected" not in batch:
            # Features: each member of a pair has its own image condition, never the winner's for both.
            raise ValueError("an i2v DPO batch of features needs 'image_latents_rejected' (the loser's condition); "
                             "extract the pairs' features with the i2v launcher (feature_extraction_i2v.sh).")
        x0_w, cond_w = self._latents(batch, generator)
        x0_l, cond_l = self._latents({**batch, "video": batch["video_rejected"],
                                      "image_latents": batch.get("image_latents_rejected")}, generator)
        prompt, prompt_mask = self._prompt(batch)
        b = x0_w.shape[0]
        t = self.scheduler.sample_timesteps(b, generator=generator)
        t = t.to(self.predictor.dtype).float().to(x0_w.device)
        noise = torch.randn(x0_w.shape, generator=generator, dtype=torch.float32).to(x0_w.device)
        prompt, prompt_mask = self.drop_captions(prompt, prompt_mask, generator)  # per pair: both members alike
        x0 = torch.cat([x0_w, x0_l]).float()
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        x_t = self.scheduler.add_noise(x0, noise2, t2)
        target = self.scheduler.velocity_target(x0, noise2)
        prompt2 = [torch.cat([p, p]) for p in prompt]
        mask2 = [torch.cat([m, m]) for m in prompt_mask]
        extra = {}
        if self.i2v:
            extra = {"image_latents": torch.cat([cond_w, cond_l]), "motion_score": self.motion_score}
        actor = self.scheduler.loss(self.predictor(x_t, t2, prompt2, mask2, **extra), target)
        reference = self._reference_losses(target, x_t, t2, prompt2, mask2, **extra)
        loss, metrics = dpo_loss(actor[:b], actor[b:], reference[:b], reference[b:], t, self.loss_beta, self.beta,
                                 self.label_smoothing, self.pref_ftx, self._pair_weights(batch, b))
        return loss, metrics


# MindSpeed-MM's name for it.
SoRADPOModel = DPOLossModel
