"""StepVideo sampling, t2v and i2v in one code path: text in (plus the first image for i2v), uint8 video out.

    pipe = StepVideoPipeline(dit, vae, text_encoder, scheduler, model_type="t2v", input_size=(204, 544, 992),
                             guidance_scale=9.0, num_inference_steps=50)
    videos = pipe(["a cat on a windowsill", "一只猫"], seeds=[1234, 1235])      # uint8 (2, 204, 544, 992, 3)
    videos = pipe(["笑起来"], images=["cat.png"], seeds=[0])                     # i2v: model_type="i2v"

Per call (official Step-Video-T2V/TI2V `video_pipeline.py`, reference §5, §6, §13):

1. Text. Each prompt gets the positive magic suffix (plain concatenation); the negative magic string alone
   is the unconditional prompt. Both encoders run on `[p + pos for p in prompts] + [neg]`; the negative
   states are expanded to the batch, so classifier-free guidance works for any batch size.
2. Noise. Video k draws its initial latents from its own `torch.Generator` seeded with `seeds[k]`, on the
   CPU in float32, so a video depends on its seed only: not on the batch it is in, the device, or how the
   work is split over ranks. For i2v the same generator then draws the VAE posterior noise of the image.
3. i2v condition. The image is resized to cover H x W and center-cropped (official rounding), encoded as a
   one-frame video (one latent frame, a posterior sample) and followed by zero latent frames.
   `motion_score` goes to the DiT unscaled.
4. Denoising. The DiT runs on `cat([latents, latents])` against `[conditional, unconditional]` text (the
   official order) in its own dtype; the timestep is cast to that dtype before the DiT, so a bf16 DiT sees
   t rounded to bf16 exactly as the official pipeline does. Guidance `uncond + scale * (cond - uncond)` is
   taken on the DiT output, the Euler step in float32 (latents stay float32 between steps).
   `guidance_scale <= 1` turns guidance off (one DiT pass on the conditional text).
5. Decode with the VAE, clamp to [-1, 1], map to uint8 (b, T, H, W, 3).

Parallelism: `group` names the ranks that work together on the same videos (the TP x CP group). Their DiT
inputs and final latents are broadcast from the group's first rank, so they agree bit for bit, and the VAE
decode is split over the group (every rank returns the whole video). With `group=None` everything is local.
`cfg_group` (CFG parallel, xDiT's idea): two ranks at the same TP x CP position of two model copies; rank 0 of it
runs the DiT on the conditional half, rank 1 on the unconditional half, and the two velocities are exchanged
(all-gather) before guidance, so both hold the same latents after every step, at half the DiT work per rank.

The text conditions (magic strings, `TextConditions`, `encode_conditions`) are in `conditions.py`, the group
broadcast in `group.py`; this file holds `StepVideoPipeline` and the per-video generator.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..models.ae import StepVideoI2VProcessor
from ..models.diffusion import FlowMatchScheduler
from .conditions import TextConditions, conditioning_texts, encode_conditions, magic_strings
from .errors import InferenceConfigError
from .group import broadcast_from_first, group_size
from .images import ImageLike, image_to_video
from .outputs import to_uint8

logger = logging.getLogger(__name__)

DEFAULT_MOTION_SCORE = 5.0


def make_generator(seed: int) -> torch.Generator:
    """The CPU generator of one video (see the module docstring, step 2)."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


class StepVideoPipeline:
    """See the module docstring."""

    def __init__(self, dit, vae, text_encoder=None, scheduler=None, *, model_type: str = "t2v",
                 input_size: Sequence[int] = (204, 544, 992), guidance_scale: float = 9.0,
                 num_inference_steps: Optional[int] = None, shift: Optional[float] = None,
                 motion_score: float = DEFAULT_MOTION_SCORE, positive_magic: Optional[str] = None,
                 negative_magic: Optional[str] = None, group=None, first_block_cache_threshold: float = 0.0,
                 cfg_group=None):
        self.positive_magic, self.negative_magic = magic_strings(model_type, positive_magic, negative_magic)
        if scheduler is None:
            scheduler = FlowMatchScheduler(shift=13.0 if shift is None else shift)
        self.dit, self.vae, self.text_encoder, self.scheduler = dit, vae, text_encoder, scheduler
        self.model_type = model_type
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = num_inference_steps or getattr(scheduler, "num_inference_timesteps", None)
        if not self.num_inference_steps or self.num_inference_steps < 1:
            raise InferenceConfigError("the number of sampling steps is not set: put diffusion.num_inference_timesteps "
                                       "(50 in the released pipeline) in the model JSON.")
        self.shift = shift
        self.motion_score = float(motion_score)
        self.group = group
        self.first_block_cache_threshold = float(first_block_cache_threshold)
        self.cfg_group = cfg_group
        self.last_cache_stats = None  # (full steps, reused steps) of the last denoise with the step cache
        self.processor = StepVideoI2VProcessor()
        self._check_models()
        self.num_frames, self.height, self.width = self._check_size(input_size)
        self.latent_frames = vae.latent_frames(self.num_frames)

    @classmethod
    def from_config(cls, model_config, dit, vae, text_encoder, scheduler, group=None) -> "StepVideoPipeline":
        """From the model JSON (`MMModelConfig`): `pipeline_config` and `diffusion` sections."""
        from ..config.model import PipelineConfig

        pc = model_config.pipeline_config or PipelineConfig()
        diffusion = model_config.diffusion
        return cls(dit, vae, text_encoder, scheduler, model_type=pc.model_type, input_size=pc.input_size,
                   guidance_scale=pc.guidance_scale,
                   num_inference_steps=diffusion.num_inference_timesteps if diffusion is not None else None,
                   shift=diffusion.shift if diffusion is not None else None, motion_score=pc.motion_score,
                   positive_magic=getattr(pc, "positive_magic", None),
                   negative_magic=getattr(pc, "negative_magic", None), group=group,
                   first_block_cache_threshold=pc.first_block_cache_threshold)

    # ---- checks ---------------------------------------------------------------------------------

    def _check_models(self) -> None:
        cfg = self.dit.predictor_config
        i2v_dit = bool(cfg.use_additional_conditions)
        if i2v_dit != (self.model_type == "i2v"):
            raise InferenceConfigError(
                f"pipeline_config.model_type is {self.model_type!r} but the DiT is a "
                f"{'i2v' if i2v_dit else 't2v'} model (predictor.use_additional_conditions="
                f"{str(i2v_dit).lower()}); use the {'i2v' if i2v_dit else 't2v'} inference JSON or the other weights."
            )
        if cfg.in_channels != self.vae.z_channels:
            raise InferenceConfigError(f"predictor.in_channels {cfg.in_channels} differs from the VAE's z_channels "
                                       f"{self.vae.z_channels} (ae.z_channels); they must be equal.")

    def _check_size(self, input_size):
        if len(input_size) != 3:
            raise InferenceConfigError(
                f"pipeline_config.input_size {list(input_size)} must be [frames, height, width].")
        frames, height, width = (int(v) for v in input_size)
        s = self.vae.spatial_factor
        if height < s or width < s or height % s or width % s:
            raise InferenceConfigError(
                f"pipeline_config.input_size: height {height} and width {width} must be positive multiples of {s} "
                f"(the VAE's spatial factor), e.g. 544 x 992.")
        if frames < 1 or self.vae.video_frames(self.vae.latent_frames(frames)) != frames:
            near = max(frames // self.vae.frame_len, 1) * self.vae.frame_len
            raise InferenceConfigError(
                f"pipeline_config.input_size: {frames} frames is not a frame count the VAE decodes to; use a multiple "
                f"of {self.vae.frame_len} (e.g. {near}; 204 for t2v, 102 for i2v), as the official pipeline rounds.")
        return frames, height, width

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def latent_shape(self):
        """(f, c, h, w) of one video's latents."""
        s = self.vae.spatial_factor
        return (self.latent_frames, self.dit.predictor_config.in_channels, self.height // s, self.width // s)

    # ---- text -----------------------------------------------------------------------------------

    def conditioning_texts(self, prompts: Sequence[str]):
        """([prompt + positive magic, ...], negative magic): the texts the encoders see."""
        return conditioning_texts(prompts, self.positive_magic, self.negative_magic)

    def encode_prompts(self, prompts: Sequence[str], batch_size: Optional[int] = None) -> TextConditions:
        """Encode the prompts (with the positive suffix) and, with guidance, the negative prompt, in one call."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass pre-encoded text (TextConditions).")
        return encode_conditions(self.text_encoder, prompts, self.positive_magic, self.negative_magic, self.guided,
                                 batch_size)

    # ---- latents --------------------------------------------------------------------------------

    def prepare_latents(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Initial noise (b, f, c, h, w), float32 on the DiT's device, one CPU generator per video."""
        noise = [torch.randn(self.latent_shape, generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(noise).to(self.dit.device)

    @torch.no_grad()
    def prepare_image_latents(self, images: Sequence[ImageLike], generators: Sequence[torch.Generator]
                              ) -> torch.Tensor:
        """i2v condition latents (b, f, c, h, w): the encoded image in latent frame 0, zeros after."""
        conds = []
        for image, generator in zip(images, generators):
            video = image_to_video(image, self.height, self.width)
            conds.append(self.processor(self.vae, video, self.latent_frames, add_noise=False, generator=generator))
        return torch.cat(conds).to(self.dit.device)

    # ---- sampling -------------------------------------------------------------------------------

    def timesteps(self) -> torch.Tensor:
        return self.scheduler.set_timesteps(self.num_inference_steps, shift=self.shift, device=self.dit.device)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, text: TextConditions,
                image_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the sampling loop from `latents` (float32 noise); returns float32 latents."""
        b = latents.shape[0]
        if len(text) != b:
            raise ValueError(f"{len(text)} encoded prompts for {b} latents.")
        guided = self.guided
        copies = 2 if guided else 1
        device = self.dit.device
        prompt, mask = text.model_inputs(guided)
        prompt = [t.to(device).contiguous() for t in prompt]
        mask = [m.to(device).contiguous() for m in mask]
        latents = latents.to(device=device, dtype=torch.float32).contiguous()
        extra = {}
        if self.model_type == "i2v":
            if image_latents is None:
                raise ValueError("i2v sampling needs image_latents (the encoded first image).")
            cond = image_latents.to(device=device, dtype=self.dit.dtype).contiguous()
            broadcast_from_first([cond], self.group)
            extra = {"image_latents": torch.cat([cond] * copies), "motion_score": self.motion_score}
        # Ranks of one TP x CP group must feed the DiT identical inputs.
        broadcast_from_first([latents, *prompt, *mask], self.group)
        timesteps = self.timesteps()
        cache = self._install_step_cache()
        try:
            latents = self._sample(latents, timesteps, prompt, mask, extra, copies)
        finally:
            self.dit.step_cache = None
        if cache is not None:
            self.last_cache_stats = (cache.computed, cache.reused)
            logger.info("first-block cache (threshold %g): %d of %d steps reused the other blocks' residual",
                        cache.threshold, cache.reused, cache.reused + cache.computed)
        broadcast_from_first([latents], self.group)
        return latents

    def _install_step_cache(self):
        if self.first_block_cache_threshold <= 0:
            return None
        from ..models.predictor.stepvideo.step_cache import FirstBlockCache

        state = self.dit.parallel
        groups = [state.tp_group, state.cp_group] if state.initialized else []
        if self.guided and self.cfg_group is not None:
            # CFG parallel: the halves sum their changes too, so both take the whole batch's decision (as one
            # process running both halves together would) instead of each deciding alone
            groups.append(self.cfg_group)
        self.dit.step_cache = FirstBlockCache(self.first_block_cache_threshold, groups)
        return self.dit.step_cache

    def _sample(self, latents, timesteps, prompt, mask, extra, copies: int) -> torch.Tensor:
        guided = copies == 2
        if guided and self.cfg_group is not None:
            return self._sample_cfg_parallel(latents, timesteps, prompt, mask, extra)
        start = time.time()
        from tqdm import tqdm

        steps = tqdm(timesteps, desc="sampling", unit="step", leave=False,
                     disable=dist.is_initialized() and dist.get_rank() != 0)
        for i, t in enumerate(steps):
            model_input = torch.cat([latents] * copies).to(self.dit.dtype)
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype)  # rounded to the DiT dtype, as official
            velocity = self.dit(model_input, timestep, prompt, mask, **extra)
            if guided:
                cond_v, uncond_v = velocity.chunk(2)
                velocity = self.scheduler.guidance(cond_v, uncond_v, self.guidance_scale)
            latents = self.scheduler.step(velocity, i, latents)
            if (i + 1) % 10 == 0 or i + 1 == len(timesteps):
                logger.info("sampling step %d/%d (%.1f s)", i + 1, len(timesteps), time.time() - start)
        return latents

    def _sample_cfg_parallel(self, latents, timesteps, prompt, mask, extra) -> torch.Tensor:
        """`_sample` with the conditional half on cfg rank 0 and the unconditional half on cfg rank 1."""
        half = dist.get_rank(self.cfg_group)  # 0: conditional, 1: unconditional (the batched order)
        prompt = [p.chunk(2)[half].contiguous() for p in prompt]
        mask = [m.chunk(2)[half].contiguous() for m in mask]
        extra = {k: (v.chunk(2)[half].contiguous() if k == "image_latents" else v) for k, v in extra.items()}
        start = time.time()
        for i, t in enumerate(timesteps):
            model_input = latents.to(self.dit.dtype)
            timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
            mine = self.dit(model_input, timestep, prompt, mask, **extra).contiguous()
            both = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(both, mine, group=self.cfg_group)
            velocity = self.scheduler.guidance(both[0], both[1], self.guidance_scale)
            latents = self.scheduler.step(velocity, i, latents)
            if (i + 1) % 10 == 0 or i + 1 == len(timesteps):
                logger.info("sampling step %d/%d (%.1f s, CFG parallel)", i + 1, len(timesteps), time.time() - start)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 videos (b, T, H, W, 3) on the CPU."""
        group = self.group if group_size(self.group) > 1 else None
        return to_uint8(self.vae.decode(latents, group=group))

    def generate(self, prompts: Optional[Sequence[str]] = None, *, text: Optional[TextConditions] = None,
                 images: Optional[Sequence[ImageLike]] = None, seeds: Optional[Sequence[int]] = None,
                 output: str = "uint8") -> torch.Tensor:
        """Generate one video per prompt (or per row of pre-encoded `text`).

        seeds: one per video (default 0, 1, ...). images: i2v only, one per video (paths or uint8 (H, W, 3)).
        output: "uint8" (b, T, H, W, 3) videos, or "latent" for the final float32 latents (b, f, c, h, w).
        """
        if text is None:
            if prompts is None:
                raise ValueError("pass prompts or pre-encoded text.")
            text = self.encode_prompts(prompts)
        b = len(text)
        seeds = list(range(b)) if seeds is None else list(seeds)
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} videos; pass one seed per video.")
        if self.model_type == "i2v":
            if images is None or len(images) != b:
                raise ValueError(f"i2v needs one image per video: {b} videos, "
                                 f"{'no' if images is None else len(images)} images.")
        elif images is not None:
            raise ValueError("images were given to a t2v pipeline; set pipeline_config.model_type to 'i2v'.")
        generators = [make_generator(s) for s in seeds]
        latents = self.prepare_latents(generators)
        image_latents = self.prepare_image_latents(images, generators) if self.model_type == "i2v" else None
        latents = self.denoise(latents, text, image_latents)
        if output == "latent":
            return latents
        if output != "uint8":
            raise ValueError(f"output {output!r} must be 'uint8' or 'latent'.")
        return self.decode(latents)

    __call__ = generate
