"""StepVideoDiT: the StepVideo 30B video diffusion transformer (t2v and i2v), TP (+SP) and CP (Ulysses, ring).

Forward contract (see docs/api.md):

    velocity = model(latents, timestep, prompt, prompt_mask, image_latents=None, motion_score=None)

- latents (b, f, c, h, w); i2v `image_latents` of the same shape are concatenated after them
  on the channel axis.
- timestep: the scheduler's t in [0, 1] (a float, a 0-d or a (b,) tensor); the DiT multiplies
  it by 1000 in the dtype it is given (pass it in the latent dtype to reproduce the official
  bf16 pipeline, which rounds t to bf16 first).
- prompt = [step_llm states (b, L1, caption_channels[0]), clip states (b, L2, caption_channels[1])];
  prompt_mask = [(b, L1), (b, L2)], 1 = attend. As in the official code only the step_llm
  mask is used, left-padded with L2 ones (every CLIP position is attended), and the text
  keys are cropped to the longest valid length in the batch.
- motion_score (i2v only): a float or (b,) tensor, not scaled; 5.0 when omitted.
- returns the velocity (b, f, out_channels, h, w).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.transformer.module import MegatronModule
from torch import nn

from mindspeed_mm.config.model import PredictorConfig, torch_dtype
from mindspeed_mm.errors import MindSpeedMMError
from mindspeed_mm.models.common.offload import LayerwiseOffload
from mindspeed_mm.models.registry import register_model
from mindspeed_mm.runtime.device import current_device

from mindspeed_mm.checkpoint.stepvideo_layout import plan_for_module

from .layers import (AdaLayerNormSingle, PatchEmbed, RMSNorm, StepVideoTransformerBlock, TextProjection,
                     core_attention_fn, layer_norm, rope_cos_sin)
from .parallelize import ParallelState, megatron_config, padded_tokens, shard_tokens, tp_shared, unshard_tokens

logger = logging.getLogger(__name__)

RECOMPUTE_GRANULARITY_FLAG = "--recompute-granularity"
RECOMPUTE_METHOD_FLAG = "--recompute-method"
RECOMPUTE_NUM_LAYERS_FLAG = "--recompute-num-layers"
DEFAULT_MOTION_SCORE = 5.0


class DiTInputError(MindSpeedMMError, ValueError):
    """Inputs (latents, conditions, text states) that do not fit the DiT's config: features or a model JSON
    that do not match the weights; the message names the config key."""


def _drop_extra_state(module, state_dict, prefix, local_metadata):
    # Megatron's parallel linears report an empty `_extra_state` (a TransformerEngine
    # compatibility stub); checkpoints in the MindSpeed-MM layout do not carry it.
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("._extra_state")]:
        del state_dict[key]


@register_model("stepvideodit")
class StepVideoDiT(MegatronModule):
    """The StepVideo DiT, plain: one config in, `nn.Linear` layers, all heads on one device.

    `StepVideoDiT.build(config)` (random weights) and `from_pretrained` (loaded) return it with the parallel plan
    of the job applied (`parallelize.parallelize_stepvideo`: Megatron's column/row layers, Ulysses/ring attention,
    sequence parallel); the plan can also be applied to a plain model afterwards."""

    def __init__(self, config: PredictorConfig, *, device: Union[str, torch.device, None] = None,
                 perform_initialization: bool = True):
        config.validate()
        dtype = torch_dtype(config.dtype)
        state = ParallelState()
        super().__init__(megatron_config(config.num_layers, config.num_heads, config.head_dim, dtype, state,
                                         perform_initialization))
        self.predictor_config = config
        self.parallel = state  # parallelize_stepvideo replaces it
        self.recompute_granularity: Optional[str] = None
        self.recompute_method: Optional[str] = None
        self.recompute_num_layers: Optional[int] = None
        self.step_cache = None  # sampling's FirstBlockCache (step_cache.py), installed by the pipeline

        device = torch.device(device) if device is not None else current_device()
        dim = config.hidden_size
        llm_channels, clip_channels = config.caption_channels
        p = config.patch_size
        i2v = config.use_additional_conditions
        core = core_attention_fn(config.attention_backend)
        kw = dict(device=device, dtype=dtype)
        with torch.device(device):
            self.pos_embed = PatchEmbed(p, config.in_channels * (2 if i2v else 1), dim, **kw)
            self.adaln_single = AdaLayerNormSingle(dim, i2v, **kw)
            self.clip_projection = nn.Linear(clip_channels, dim, **kw)
            self.caption_norm = nn.LayerNorm(llm_channels, eps=config.norm_eps,
                                             elementwise_affine=config.norm_elementwise_affine, **kw)
            self.caption_projection = TextProjection(llm_channels, dim, **kw)
            self.transformer_blocks = nn.ModuleList([
                StepVideoTransformerBlock(
                    dim, config.head_dim, config.channel_split, config.attention_norm_eps,
                    config.attention_norm_elementwise_affine, config.dropout, core, **kw)
                for _ in range(config.num_layers)
            ])
            self.norm_out = nn.LayerNorm(dim, eps=config.norm_eps,
                                         elementwise_affine=config.norm_elementwise_affine, **kw)
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim, **kw) / dim ** 0.5)
            self.proj_out = nn.Linear(dim, p * p * config.out_channels, **kw)
        self.register_state_dict_post_hook(_drop_extra_state)
        if perform_initialization and device.type != "meta":
            self.reset_parameters()

    # --- construction helpers ---------------------------------------------------------------

    @classmethod
    def build(cls, config: PredictorConfig, *, device=None, perform_initialization: bool = True,
              parallel: Optional[ParallelState] = None) -> "StepVideoDiT":
        """A DiT with random weights (`reset_parameters`), the job's parallel plan applied (`parallel`, default:
        the plan of Megatron's parallel state), built on `meta` first so that each rank allocates only its share."""
        from .pretrained import build_model

        return build_model(cls, config, device=device, perform_initialization=perform_initialization,
                           parallel=parallel)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random weights: the planned linears (column/row layers under TP) N(0, 0.02) with zero bias, drawn per TP
        shard from the model-parallel RNG stream; other layers PyTorch's defaults; norms one; the modulation
        tables N(0, 1/dim)."""
        shard_stream = contextlib.nullcontext
        if self.parallel.initialized and self.parallel.tp > 1:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker
            from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME

            tracker = get_cuda_rng_tracker()
            if _MODEL_PARALLEL_RNG_TRACKER_NAME in tracker.get_states():  # seeded (runtime.set_random_seed)
                shard_stream = tracker.fork
        for name, module in self.named_modules():
            if plan_for_module(name) is not None:
                with shard_stream():
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        dim = self.predictor_config.hidden_size
        for name, param in self.named_parameters():
            if name.endswith("scale_shift_table"):
                param.copy_(torch.randn(param.shape, dtype=torch.float32) / dim ** 0.5)

    @classmethod
    def from_pretrained(cls, path, config: Optional[PredictorConfig] = None, *, device=None, **overrides):
        """Load official diffusers-format weights or a Megatron-layout checkpoint, strictly.

        See `pretrained.load_pretrained` and docs/api.md for how the config is determined.
        """
        from .pretrained import load_pretrained

        return load_pretrained(cls, path, config=config, device=device, **overrides)

    @classmethod
    def from_model(cls, other: "StepVideoDiT") -> "StepVideoDiT":
        """Another DiT with `other`'s config, device and weights, copied tensor by tensor: no file is read and no
        initialisation pass runs (DPO's actor and reference from one read of the same checkpoint)."""
        from .pretrained import copy_model

        return copy_model(other)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embed.proj.weight.device

    def configure_recompute(self, granularity: Optional[str], method: Optional[str] = None,
                            num_layers: Optional[int] = None) -> None:
        """Activation recompute as Megatron's flags: granularity "full" with method "block"
        (the first `num_layers` blocks each recomputed) or "uniform" (groups of `num_layers`
        blocks recomputed together); granularity None turns it off."""
        total = self.predictor_config.num_layers
        if granularity is None:
            self.recompute_granularity = self.recompute_method = self.recompute_num_layers = None
            return
        if granularity == "selective":
            raise ValueError(
                f"{RECOMPUTE_GRANULARITY_FLAG} selective is not supported by the StepVideo DiT (it has no "
                f"separable core-attention recompute); use {RECOMPUTE_GRANULARITY_FLAG} full."
            )
        if granularity != "full":
            raise ValueError(f"{RECOMPUTE_GRANULARITY_FLAG} {granularity!r} is unknown; use full (or omit it).")
        if method not in ("block", "uniform"):
            raise ValueError(
                f"{RECOMPUTE_GRANULARITY_FLAG} full needs {RECOMPUTE_METHOD_FLAG} block or uniform, got {method!r}."
            )
        if num_layers is None or num_layers < 1:
            raise ValueError(
                f"{RECOMPUTE_NUM_LAYERS_FLAG} {num_layers} must be at least 1 (with {RECOMPUTE_METHOD_FLAG} {method})."
            )
        if num_layers > total:
            # The seed's pretrain launchers pass 48 with 24-layer example configs: recompute every block.
            logger.info("%s %d exceeds the model's %d layers; recomputing all of them.",
                        RECOMPUTE_NUM_LAYERS_FLAG, num_layers, total)
            num_layers = total
        self.recompute_granularity, self.recompute_method, self.recompute_num_layers = granularity, method, num_layers

    def compile_blocks(self, **options) -> None:
        """torch.compile every transformer block in place (`nn.Module.compile`: the module, its parameters and
        their keys stay as they are). The blocks share one code object, so one compiled graph serves them all;
        the first step pays the compilation."""
        for block in self.transformer_blocks:
            block.compile(**options)

    def offload_blocks(self, device) -> LayerwiseOffload:
        """Single-device inference of a DiT larger than the device: everything outside the transformer blocks
        moves to `device`, the blocks stay in (pinned) host memory and each is copied in just before it runs
        (models/common/offload.py). Call it on a DiT built on the CPU, after any LoRA adapter is applied."""
        offload = LayerwiseOffload(self.transformer_blocks, device)
        for name, child in self.named_children():
            if name != "transformer_blocks":
                child.to(device)
        for tensor in list(self._parameters.values()) + list(self._buffers.values()):
            if tensor is not None:
                tensor.data = tensor.data.to(device)
        return offload

    @property
    def fused_elementwise(self) -> bool:
        """The fused elementwise path of the blocks (layers.py's docstring); False: the official op order."""
        return all(m.fused for m in self.modules() if hasattr(m, "fused"))

    @fused_elementwise.setter
    def fused_elementwise(self, value: bool) -> None:
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = bool(value)

    # --- forward ----------------------------------------------------------------------------

    def text_states(self, llm_states: torch.Tensor, clip_states: torch.Tensor) -> torch.Tensor:
        """cat([clip_projection(clip), caption_projection(caption_norm(llm))]) -> (b, L2+L1, D)."""
        llm = self.caption_projection(self.caption_norm(llm_states.to(self.dtype)))
        clip = self.clip_projection(clip_states.to(self.dtype))
        return torch.cat([clip, llm], dim=1)

    def forward(self, latents: torch.Tensor, timestep, prompt: Sequence[torch.Tensor],
                prompt_mask: Sequence[torch.Tensor], image_latents: Optional[torch.Tensor] = None,
                motion_score=None) -> torch.Tensor:
        cfg, state = self.predictor_config, self.parallel
        llm_states, clip_states, llm_mask = self._check_inputs(latents, prompt, prompt_mask, image_latents,
                                                               motion_score)
        b, frames, _, height, width = latents.shape
        dtype, device = self.dtype, latents.device
        x = latents.to(dtype)
        if cfg.use_additional_conditions:
            x = torch.cat([x, image_latents.to(dtype)], dim=2)
        p = cfg.patch_size
        h, w = height // p, width // p
        tokens = self.pos_embed(x.reshape(b * frames, x.shape[2], height, width))
        tokens = tokens.reshape(b, frames * h * w, cfg.hidden_size)
        # The token split of context and sequence parallel (parallelize.py): pad, keep this rank's chunk.
        s = tokens.shape[1]
        s_pad = padded_tokens(s, state)
        if s_pad > s:
            tokens = F.pad(tokens, (0, 0, 0, s_pad - s))
        tokens = shard_tokens(tokens, state)
        s_cp = s_pad // state.cp  # the tokens of this CP rank: what attention sees, and RoPE covers
        first = state.cp_rank * s_cp
        token_mask = None
        if s_pad > s:
            token_mask = (torch.arange(first, first + s_cp, device=device) < s)[None].expand(b, -1)

        t = self._timestep(timestep, b, device)
        motion = self._motion_score(motion_score, b, device) if cfg.use_additional_conditions else None
        modulation, embedded = self.adaln_single(t, motion)

        text, key_mask = self._crop_text(self.text_states(llm_states, clip_states), llm_mask, clip_states.shape[1])
        cos, sin = rope_cos_sin(first, s_cp, frames, h, w, cfg.channel_split, dtype, device)
        tokens = self._run_blocks(tokens, text, modulation, key_mask, cos, sin, token_mask)

        shift, scale = tp_shared(self.scale_shift_table[None] + embedded[:, None], state).chunk(2, dim=1)
        hidden = layer_norm(self.norm_out, tokens, state) * (1 + scale) + shift
        out = F.linear(hidden, tp_shared(self.proj_out.weight, state), tp_shared(self.proj_out.bias, state))
        out = unshard_tokens(out, state)[:, :s]
        c = cfg.out_channels
        out = out.reshape(b, frames, h, w, p, p, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, frames, c, h * p, w * p)

    def _check_inputs(self, latents, prompt, prompt_mask, image_latents, motion_score):
        cfg = self.predictor_config
        if latents.dim() != 5:
            raise ValueError(f"latents must be (b, f, c, h, w), got shape {tuple(latents.shape)}.")
        b, _, c, height, width = latents.shape
        if c != cfg.in_channels:
            raise DiTInputError(f"latents have {c} channels but the predictor's in_channels is {cfg.in_channels}; "
                                f"the latents (features, ae.z_channels) and the DiT config must agree.")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise DiTInputError(f"latent height/width {height}x{width} must be multiples of patch_size "
                                f"{cfg.patch_size}; choose a video resolution whose latents are.")
        if cfg.use_additional_conditions:
            if image_latents is None:
                raise DiTInputError("this is an i2v DiT (use_additional_conditions=true): pass image_latents "
                                 "(b, f, c, h, w), the condition frames concatenated on the channel axis.")
            if tuple(image_latents.shape) != tuple(latents.shape):
                raise DiTInputError(f"image_latents {tuple(image_latents.shape)} must have the latents' shape "
                                 f"{tuple(latents.shape)}.")
        elif image_latents is not None or motion_score is not None:
            raise DiTInputError("image_latents/motion_score were given to a t2v DiT (use_additional_conditions=false); "
                             "load i2v weights or drop them.")
        if not isinstance(prompt, (list, tuple)) or len(prompt) != 2:
            raise ValueError("prompt must be [step_llm states (b, L1, C1), clip states (b, L2, C2)].")
        if not isinstance(prompt_mask, (list, tuple)) or len(prompt_mask) != 2:
            raise ValueError("prompt_mask must be [step_llm mask (b, L1), clip mask (b, L2)], 1 = attend.")
        llm, clip = (t.squeeze(1) if t.dim() == 4 else t for t in prompt)  # also accept (b, 1, L, C)
        llm_mask = prompt_mask[0].squeeze(1) if prompt_mask[0].dim() == 3 else prompt_mask[0]
        for name, t, width in (("step_llm", llm, cfg.caption_channels[0]), ("clip", clip, cfg.caption_channels[1])):
            if t.dim() != 3 or t.shape[0] != b or t.shape[2] != width:
                raise DiTInputError(f"{name} states must be (b={b}, L, {width}) (caption_channels), "
                                 f"got {tuple(t.shape)}.")
        if tuple(llm_mask.shape) != tuple(llm.shape[:2]):
            raise ValueError(f"step_llm mask {tuple(llm_mask.shape)} must be (b, L1) = {tuple(llm.shape[:2])}.")
        return llm, clip, llm_mask

    def _timestep(self, timestep, b: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if not t.is_floating_point():
            t = t.float()
        low, high = float(t.min()), float(t.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"timestep values lie in [{low:g}, {high:g}], but the DiT takes the scheduler's t in [0, 1] "
                f"(t = 0 is pure noise) and multiplies it by 1000 itself; do not pass 0..999 timesteps."
            )
        if t.numel() == 1:
            return t.reshape(1).expand(b)
        if t.shape != (b,):
            raise ValueError(f"timestep must be a scalar or shape ({b},), got {tuple(t.shape)}.")
        return t

    def _motion_score(self, motion_score, b: int, device) -> torch.Tensor:
        value = DEFAULT_MOTION_SCORE if motion_score is None else motion_score
        # The official code builds it in the latent (model) dtype; it is not scaled by 1000.
        m = torch.as_tensor(value, device=device).to(self.dtype)
        if m.numel() == 1:
            return m.reshape(1).expand(b)
        if m.shape != (b,):
            raise ValueError(f"motion_score must be a float or shape ({b},), got {tuple(m.shape)}.")
        return m

    @staticmethod
    def _crop_text(text: torch.Tensor, llm_mask: torch.Tensor, clip_len: int):
        valid = llm_mask.to(torch.bool)
        lengths = valid.sum(dim=1)
        positions = torch.arange(valid.shape[1], device=valid.device)
        if not torch.equal(valid, positions[None, :] < lengths[:, None]):
            raise DiTInputError("the step_llm mask must be a prefix of ones per sample (right padding): the DiT "
                             "uses only its valid length, as the official code does.")
        kv_len = lengths + clip_len
        max_kv = int(kv_len.max())
        if bool((kv_len == max_kv).all()):
            return text[:, :max_kv], None  # every key valid: no mask keeps attention on its fastest kernel
        key_mask = torch.arange(max_kv, device=text.device)[None, :] < kv_len.to(text.device)[:, None]
        return text[:, :max_kv], key_mask

    def _run_blocks(self, x, *args):
        """args: text, modulation, key_mask, cos, sin, token_mask (StepVideoTransformerBlock.forward)."""
        blocks = self.transformer_blocks
        if self.step_cache is not None and not torch.is_grad_enabled():
            return self.step_cache.run(blocks, x, *args)
        if self.recompute_granularity != "full" or not torch.is_grad_enabled():
            for block in blocks:
                x = block(x, *args)
            return x
        n = self.recompute_num_layers
        if self.recompute_method == "uniform":
            for start in range(0, len(blocks), n):
                x = self._checkpointed(start, min(start + n, len(blocks)), x, *args)
            return x
        for i, block in enumerate(blocks):  # "block": the first n blocks, each on its own
            if i < n:
                x = self._checkpointed(i, i + 1, x, *args)
            else:
                x = block(x, *args)
        return x

    def _checkpointed(self, start: int, end: int, *args):
        blocks = self.transformer_blocks

        def run(x, *rest):
            for block in blocks[start:end]:
                x = block(x, *rest)
            return x

        if self.parallel.initialized:
            # Megatron's checkpoint also restores the model-parallel RNG tracker's states. It is reentrant: with a
            # frozen base (LoRA) no input requires grad and the blocks' adapters would get none; nothing before the
            # blocks needs a gradient then, so the input can start the graph here.
            from megatron.core import tensor_parallel

            if torch.is_grad_enabled() and not args[0].requires_grad:
                args = (args[0].detach().requires_grad_(),) + args[1:]
            return tensor_parallel.checkpoint(run, False, *args)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

