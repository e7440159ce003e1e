"""DiffusionLossModel: a batch in, the per-sample flow-matching loss out (pretraining and, with pairs, DPO).

    loss = model(batch, generator)     # (b,) float32

A batch is what `mindspeed_mm.data.collate` makes, either from extracted features
(`load_video_features` / `load_text_features`: "video" holds VAE latents (b, t, z, h, w) and
"prompt" the encoders' states) or from raw videos (pixels (b, T, 3, H, W) in [-1, 1] and token ids "prompt_ids"),
which are encoded here by the frozen VAE and text encoders.

The loss follows the released weights' convention (DESIGN.md): t ~ logit-normal, x_t = t·x0 + (1 − t)·ε,
the DiT predicts v = x0 − ε, and the loss is the per-sample mean squared error. `generator` draws t, ε
and the i2v pixel noise; it must be seeded identically on the tensor- and context-parallel ranks that
share a batch (the trainer seeds it from the seed, the data-parallel rank and the iteration).

Caption dropout (`caption_dropout` p, the data JSON's `preprocess_parameters.cfg`): after t and ε, one uniform
draw per sample from the same generator; a sample whose draw is below p is trained on the empty prompt's states
(`empty_prompt`, or the text encoder's encoding of "" when it runs here) instead of its caption's, so the
unconditional branch that classifier-free guidance samples with is trained too. Every TP/CP rank draws alike and a
resumed run draws what the uninterrupted one did. p = 0 draws nothing.

`enable_encoder_dp` (raw videos): the tensor- and context-parallel ranks of a group hold the same micro-batches, so
instead of each of them running the frozen encoders on all of them, `encode_iteration(batches, generators)` runs
the deterministic part (VAE posterior, Step-LLM and CLIP states) of micro-batch m on group rank m % size only,
shares the results over the group, and then every rank draws the random parts (the VAE's eps, the i2v first-frame
noise) from each micro-batch's generator in the order `forward` draws them: `forward` on the encoded batches gives
the losses of `forward` on the raw ones, bit for bit, and leaves the generators in the same state.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule

from .ae import StepVideoI2VProcessor, StepVideoVAE
from .diffusion import FlowMatchScheduler
from .lora import LORA_SUFFIXES
from .predictor import StepVideoDiT
from .text_encoder import StepVideoTextEncoder

# Set in a batch that `encode_iteration` made: its "video" holds latents and "prompt" the encoders' states.
ENCODED_KEY = "encoded_in_group"


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


class DiffusionLossModel(MegatronModule):
    """The trainable DiT plus, when the data are raw videos, the frozen VAE and text encoders.

    `enable_encoder_dp` with `encoder_group` (the tensor x context parallel group, whose ranks hold the same
    micro-batches): the frozen encoders' work is shared over the group by `encode_iteration` (module docstring).
    """

    # (pixels key, i2v condition key) of each video a batch holds, in the order `forward` encodes them.
    video_keys: Tuple[Tuple[str, str], ...] = (("video", "image_latents"),)

    def __init__(self, predictor: StepVideoDiT, scheduler: FlowMatchScheduler, vae: Optional[StepVideoVAE] = None,
                 text_encoder: Optional[StepVideoTextEncoder] = None, i2v: bool = False,
                 motion_score: float = 5.0, enable_encoder_dp: bool = False, encoder_group=None,
                 caption_dropout: float = 0.0, empty_prompt: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]
                 = None):
        super().__init__(predictor.config)
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption dropout {caption_dropout} must be in [0, 1).")
        if caption_dropout > 0 and empty_prompt is None and text_encoder is None:
            raise ValueError("caption dropout needs the empty prompt's states (extracted features: empty_prompt.pt) "
                             "or a text encoder to encode it.")
        self.caption_dropout = caption_dropout
        self._empty_prompt = empty_prompt
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
        self.enable_encoder_dp = enable_encoder_dp
        self.encoder_group = encoder_group
        if caption_dropout > 0 and empty_prompt is None:
            self.empty_prompt_states()  # encode "" now, once per rank, not at whichever step first drops a caption

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        # The checkpoint holds the DiT under its own names (no "predictor." prefix), as MindSpeed-MM does; with LoRA
        # only the adapters (the base is what --load names, recorded in lora.json).
        state = self.predictor.state_dict(prefix=prefix, keep_vars=keep_vars)
        if any(k.endswith(LORA_SUFFIXES) for k in state):
            return {k: v for k, v in state.items() if k.endswith(LORA_SUFFIXES)}
        return state

    # ---- inputs -----------------------------------------------------------------------------

    @property
    def encodes_videos(self) -> bool:
        """True when batches hold pixels that the frozen VAE encodes here (load_video_features false)."""
        return self._vae.module is not None

    @property
    def encodes_in_group(self) -> bool:
        """True when the trainer should call `encode_iteration`: enable_encoder_dp, a group of more than one rank,
        and frozen encoders to run (raw videos or token ids)."""
        return (bool(self.enable_encoder_dp) and self.encoder_group is not None
                and dist.get_world_size(self.encoder_group) > 1
                and (self._vae.module is not None or self._text_encoder.module is not None))

    @staticmethod
    def _check_pixels(video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"batch['video'] must be pixels (b, T, 3, H, W) when the model encodes videos "
                             f"(load_video_features false); got shape {tuple(video.shape)}.")

    def _latents(self, batch: Dict, generator: Optional[torch.Generator]
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        video = batch["video"]
        device = self.predictor.device
        vae = self._vae.module
        if vae is not None and not batch.get(ENCODED_KEY):  # raw videos: pixels (b, T, 3, H, W) in [-1, 1]
            self._check_pixels(video)
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
        masks = list(batch["prompt_mask"])
        device = self.predictor.device
        if "prompt" in batch:  # the encoders' states (extracted features, or encoded by encode_iteration)
            return [t.to(device) for t in batch["prompt"]], [m.to(device) for m in masks]
        if self._text_encoder.module is None:
            raise ValueError("the batch holds token ids ('prompt_ids') but the model has no text encoder; set "
                             "load_text_features false in the model JSON (with a text_encoder section), or train "
                             "on extracted features.")
        return self._text_encoder.module.encode_tokens(list(batch["prompt_ids"]), masks)

    def empty_prompt_states(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The empty prompt's ([llm (1, L1, C1), clip (1, L2, C2)], [masks]) on the DiT's device."""
        if self._empty_prompt is None:
            with torch.no_grad():
                states, masks = self._text_encoder.module([""])
            self._empty_prompt = ([s.detach() for s in states], [m.detach() for m in masks])
        device = self.predictor.device
        if self._empty_prompt[0][0].device != device:  # moved once, not at every dropped caption
            self._empty_prompt = tuple([t.to(device) for t in part] for part in self._empty_prompt)
        return self._empty_prompt

    def drop_captions(self, prompt: List[torch.Tensor], mask: List[torch.Tensor], generator
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Caption dropout (module docstring): rows drawn below p get the empty prompt's states and masks."""
        if self.caption_dropout <= 0:
            return prompt, mask
        b = prompt[0].shape[0]
        dropped = torch.rand(b, generator=generator) < self.caption_dropout
        if not bool(dropped.any()):
            return prompt, mask
        rows = dropped.nonzero().flatten().to(prompt[0].device)
        empty, empty_mask = self.empty_prompt_states()
        out, out_mask = [], []
        for states, m, e, em in zip(prompt, mask, empty, empty_mask):
            length = states.shape[1]
            e, em = _fit(e, length), _fit(em, length)  # the batch's padded length
            states, m = states.clone(), m.clone()
            states[rows] = e.to(states.dtype).expand(len(rows), *e.shape[1:])
            m[rows] = em.to(m.dtype).expand(len(rows), *em.shape[1:])
            out.append(states)
            out_mask.append(m)
        return out, out_mask

    # ---- encoding shared over the tensor x context parallel group ---------------------------

    def encode_iteration(self, batches: Sequence[Dict], generators: Sequence[torch.Generator]) -> List[Dict]:
        """The iteration's micro-batches with latents, i2v conditions and prompt states in place of pixels and token
        ids; `forward(encoded[m], generators[m])` then gives `forward(batches[m], generators[m])` bit for bit.

        Every rank of the group must call it with the same micro-batches and identically seeded generators (the
        trainer's). Steps: (1) every rank draws, from each micro-batch's generator and in `forward`'s order, the
        VAE eps of each video, then (i2v) the first-frame pixel noise and the condition's eps; (2) group rank
        m % size runs the deterministic encoders on micro-batch m, as `forward` would (the whole micro-batch in one
        call); (3) the results are shared (`_share`); (4) every rank forms latents = mean + std * eps. The
        generators continue from where (1) left them, as after `forward`'s encoding. Without a group of several
        ranks (`encodes_in_group` false) this rank does everything, with no communication.
        """
        if len(generators) != len(batches):
            raise ValueError(f"encode_iteration needs one generator per micro-batch: {len(batches)} micro-batches, "
                             f"{len(generators)} generators.")
        group = self.encoder_group if self.encodes_in_group else None
        size, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
        draws = [self._draw_encoder_noise(batch, generator) for batch, generator in zip(batches, generators)]
        local = {m: self._encode_deterministic(batches[m], draws[m]) for m in range(len(batches)) if m % size == rank}
        encoded = local if group is None else _share(local, len(batches), group, self.predictor.device)
        return [self._assemble(batch, drawn, encoded[m]) for m, (batch, drawn) in enumerate(zip(batches, draws))]

    def _encodes_text(self, batch: Dict) -> bool:
        return self._text_encoder.module is not None and "prompt" not in batch

    def _draw_encoder_noise(self, batch: Dict, generator: torch.Generator) -> Dict[str, Dict[str, torch.Tensor]]:
        """{pixels key: {"eps", and for i2v "first" (the noised first frames) and "first_eps"}}, drawn in the order
        of `_latents` (vae.encode, then the i2v processor) for each video of `video_keys` in turn."""
        vae = self._vae.module
        if vae is None:
            return {}
        out = {}
        for key, _ in self.video_keys:
            if key not in batch:
                raise ValueError(f"the batch has no {key!r}; this model encodes {[k for k, _ in self.video_keys]}.")
            pixels = batch[key]
            self._check_pixels(pixels)
            vae._check_video(pixels)
            drawn = {"eps": vae.draw_eps(vae.latent_shape(pixels.shape), generator, vae.device)}
            if self.i2v:
                first = self.i2v_processor.noise_first_frame(pixels[:, :1].to(self.predictor.device), generator)
                drawn["first"] = first
                drawn["first_eps"] = vae.draw_eps(vae.latent_shape(first.shape), generator, vae.device)
            out[key] = drawn
        return out

    def _encode_deterministic(self, batch: Dict, drawn: Dict) -> Dict[str, torch.Tensor]:
        """The encoders' outputs for one micro-batch, computed as `forward` computes them (one call per video)."""
        out = {}
        vae = self._vae.module
        with torch.no_grad():
            for key, _ in self.video_keys if vae is not None else ():
                out[f"{key}.mean"], out[f"{key}.std"] = vae.encode_distribution(batch[key].to(self.predictor.device))
                if self.i2v:
                    out[f"{key}.first_mean"], out[f"{key}.first_std"] = vae.encode_distribution(drawn[key]["first"])
            if self._encodes_text(batch):
                states, _ = self._text_encoder.module.encode_tokens(list(batch["prompt_ids"]),
                                                                    list(batch["prompt_mask"]))
                out.update({f"prompt.{i}": state for i, state in enumerate(states)})
        return out

    def _assemble(self, batch: Dict, drawn: Dict, encoded: Dict[str, torch.Tensor]) -> Dict:
        out = {**batch, ENCODED_KEY: True}
        vae = self._vae.module
        for key, cond_key in self.video_keys if vae is not None else ():
            latents = vae.sample(encoded[f"{key}.mean"], encoded[f"{key}.std"], eps=drawn[key]["eps"])
            if latents.shape != drawn[key]["eps"].shape:
                raise RuntimeError(f"encode_iteration: latents {tuple(latents.shape)} for {key!r} but eps drawn for "
                                   f"{tuple(drawn[key]['eps'].shape)}; the VAE's latent_shape is wrong.")
            out[key] = latents
            if self.i2v:
                first = vae.sample(encoded[f"{key}.first_mean"], encoded[f"{key}.first_std"],
                                   eps=drawn[key]["first_eps"])
                out[cond_key] = self.i2v_processor.pad(first, latents.shape[1])
        if self._encodes_text(batch):
            device = self.predictor.device
            count = sum(1 for name in encoded if name.startswith("prompt."))
            out["prompt"] = [encoded[f"prompt.{i}"] for i in range(count)]
            del out["prompt_ids"]
            out["prompt_mask"] = [m.to(device) for m in batch["prompt_mask"]]
        return out

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
        prompt, prompt_mask = self.drop_captions(prompt, prompt_mask, generator)
        noise = noise.to(x0.device, torch.float32)
        x0 = x0.float()
        x_t = self.scheduler.add_noise(x0, noise, t)
        extra = {"image_latents": cond, "motion_score": self.motion_score} if self.i2v else {}
        prediction = self.predictor(x_t, t, prompt, prompt_mask, **extra)
        return self.scheduler.loss(prediction, self.scheduler.velocity_target(x0, noise))


def _fit(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`tensor` (1, L, ...) cut or zero-padded to L = length on dim 1 (zeros are masked-out positions)."""
    if tensor.shape[1] >= length:
        return tensor[:, :length]
    pad = torch.zeros((1, length - tensor.shape[1], *tensor.shape[2:]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


def _share(local: Dict[int, Dict[str, torch.Tensor]], count: int, group, device: torch.device
           ) -> Dict[int, Dict[str, torch.Tensor]]:
    """{micro-batch: {name: tensor}} of all `count` micro-batches on every rank of `group`, from each rank's `local`
    (the micro-batches it owns).

    One `all_gather_object` of the names, shapes and dtypes (a few hundred bytes a rank), then one `broadcast` per
    rank of its tensors packed as bytes into one buffer (on the CPU for gloo, on `device` for nccl / hccl): every
    rank receives the encoders' outputs of the micro-batches it does not own, once. The bytes are the owner's, so
    the values are bit for bit the owner's.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    specs = {m: [(name, tuple(t.shape), t.dtype) for name, t in outs.items()] for m, outs in local.items()}
    gathered = [None] * size
    dist.all_gather_object(gathered, specs, group=group)
    owned = sorted(m for part in gathered for m in part)
    if owned != list(range(count)):
        raise RuntimeError(f"encode_iteration: the ranks of the encoder group encoded micro-batches {owned} of "
                           f"{count}; every rank must be given the same micro-batches.")
    comm = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    out = dict(local)
    for src in range(size):
        layout, offset = [], 0
        for m in sorted(gathered[src]):
            for name, shape, dtype in gathered[src][m]:
                nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                layout.append((m, name, shape, dtype, offset, nbytes))
                offset += -(-nbytes // 16) * 16  # aligned: each piece is viewed back as its dtype without a copy
        if offset == 0:
            continue
        if src == rank:
            buffer = torch.zeros(offset, dtype=torch.uint8, device=comm)
            for m, name, _, _, start, nbytes in layout:
                buffer[start:start + nbytes] = local[m][name].detach().contiguous().reshape(-1).view(torch.uint8)
        else:
            buffer = torch.empty(offset, dtype=torch.uint8, device=comm)
        dist.broadcast(buffer, src=dist.get_global_rank(group, src), group=group)
        if src == rank:
            continue
        for m, name, shape, dtype, start, nbytes in layout:
            out.setdefault(m, {})[name] = buffer[start:start + nbytes].view(dtype).view(shape).to(device)
    return out


# MindSpeed-MM's and the user guide's name for it.
SoRAModel = DiffusionLossModel
