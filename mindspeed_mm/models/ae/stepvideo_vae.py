"""`StepVideoVAE`: the StepVideo Video-VAE (version 2 and version 1), registered as "stepvideovae".

Contract (docs/api.md, VAE section):
- `encode(video, sample=True, generator=None)`: video (b, T, 3, H, W) in [-1, 1] -> latents
  (b, t, z, h, w). The video is cut into `frame_len`-frame chunks, each encoded from a fresh
  causal start; the posterior is sampled (mean + exp(logvar / 2) * N(0, 1), logvar clamped to
  [-30, 20]) as the official code does; `sample=False` returns the mean. No latent scaling.
  `encode_distribution(video) -> (mean, std)` is its deterministic part and `sample(mean, std,
  generator)` its draw (`draw_eps` draws the same eps ahead), for encoding shared over ranks.
- `decode(latents, group=...)`: latents (b, t, z, h, w) -> video (b, T, 3, H, W). Latents are
  cut into `latent_len`-latent chunks decoded independently, then `mix()` blends each chunk
  boundary. With a process group of several ranks each rank decodes its share of chunks and
  the frames are gathered: bitwise the single-process result.
- Optional spatial tiling (`use_tiling`), off by default; see `tiling.py`.

Version 2 (`vae_v2.safetensors`): z = 64, 16x spatial, 17 frames -> 3 latents, per-frame GroupNorm.
Version 1 (`vae.safetensors`): z = 16, 8x spatial, 17 frames -> 5 latents, whole-clip GroupNorm.
"""

from __future__ import annotations

from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_mm.models.registry import register_model

from . import checkpoint as ckpt
from .networks import NUM_LEVELS, VideoDecoder, VideoEncoder, patch_channels
from .tiling import tiled_apply
from ...errors import MindSpeedMMError

_AUTO = "auto"
LOGVAR_RANGE = (-30.0, 20.0)
MIX_REMAIN = 0.6


class VAEInputError(MindSpeedMMError, ValueError):
    """A video or latent tensor the VAE cannot take; the message says what is accepted."""


class VAEConfigError(MindSpeedMMError, ValueError):
    """Constructor arguments (the model JSON's `ae` section) that do not describe a buildable StepVideo VAE."""

    same_on_all_ranks = True  # checks of config values, identical on every rank


def _dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    from mindspeed_mm.config.model import torch_dtype

    return torch_dtype(value)


@register_model("stepvideovae")
class StepVideoVAE(nn.Module):
    """The StepVideo Video-VAE. Defaults are the official (released) widths of version 2.

    Args:
        from_pretrained: the official `vae_v2.safetensors` / `vae.safetensors` (or the folder that
            holds them), loaded strictly; None builds randomly initialised weights.
        z_channels, version, frame_len: as the seed's `ae` JSON. `frame_len` must be
            1 + k * temporal_factor (8 for version 2, 4 for version 1); 17 is the official value.
        encoder_ch, encoder_ch_mult, decoder_ch, decoder_ch_mult, num_res_blocks: widths
            (the official code hard-codes the defaults; small values build tiny test models).
        dtype: parameter and compute dtype (torch dtype or a config name such as "bf16").
        device: where to build; default the runtime's current device.
        use_tiling, tile_sample_size, tile_overlap: spatial tiling, in pixels (multiples of
            the spatial factor). Off by default; `enable_tiling()` switches it later.
        decode_group: default process group of `decode`: "auto" (the whole world when
            torch.distributed is initialised with more than one rank), None (no parallelism),
            or a `torch.distributed` process group.
    """

    def __init__(self, from_pretrained: Optional[str] = None, z_channels: int = 64, version: int = 2,
                 frame_len: int = 17, encoder_ch: int = 32, encoder_ch_mult: Sequence[int] = (4, 8, 16, 16),
                 decoder_ch: int = 128, decoder_ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 dtype: Union[str, torch.dtype] = torch.float32, device: Union[str, torch.device, None] = None,
                 use_tiling: bool = False, tile_sample_size: int = 256, tile_overlap: int = 64,
                 decode_group=_AUTO):
        super().__init__()
        self.arch = {
            "version": int(version), "z_channels": int(z_channels), "encoder_ch": int(encoder_ch),
            "encoder_ch_mult": tuple(int(m) for m in encoder_ch_mult), "decoder_ch": int(decoder_ch),
            "decoder_ch_mult": tuple(int(m) for m in decoder_ch_mult), "num_res_blocks": int(num_res_blocks),
        }
        _validate_arch(**self.arch)
        self.version = int(version)
        self.z_channels = int(z_channels)
        self.spatial_factor = 16 if self.version == 2 else 8
        self.temporal_factor = 8 if self.version == 2 else 4
        if frame_len < 1 or (frame_len - 1) % self.temporal_factor:
            raise VAEConfigError(
                f"frame_len {frame_len} is not 1 + k*{self.temporal_factor}: a version-{self.version} chunk of "
                f"T frames encodes to 1 + (T-1)/{self.temporal_factor} latents. The official value is 17."
            )
        self.frame_len = int(frame_len)
        self.latent_len = (self.frame_len - 1) // self.temporal_factor + 1
        self.decode_group = decode_group
        self.set_tiling(use_tiling, tile_sample_size, tile_overlap)

        dtype = _dtype(dtype)
        if device is None:
            from mindspeed_mm.runtime import current_device

            device = current_device()
        device = torch.device(device)
        build_on = torch.device("meta") if from_pretrained else device
        with build_on:
            self.encoder = VideoEncoder(encoder_ch, self.arch["encoder_ch_mult"], num_res_blocks, z_channels,
                                        self.version)
            self.decoder = VideoDecoder(decoder_ch, self.arch["decoder_ch_mult"], num_res_blocks, z_channels,
                                        self.version)
        if from_pretrained:
            self.weights_file = self._load(from_pretrained, dtype, device)
        else:
            self.weights_file = None
            self.to(dtype=dtype)
        self.requires_grad_(False)
        self.eval()

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, device: Union[str, torch.device, None] = None, **overrides) -> "StepVideoVAE":
        """Build from an `AEConfig` (the `ae` section of the model JSON); keyword overrides win."""
        kwargs = dict(
            from_pretrained=config.from_pretrained, z_channels=config.z_channels, version=config.version,
            frame_len=config.frame_len, encoder_ch=config.encoder_ch, encoder_ch_mult=config.encoder_ch_mult,
            decoder_ch=config.decoder_ch, decoder_ch_mult=config.decoder_ch_mult,
            num_res_blocks=config.num_res_blocks, dtype=config.dtype, use_tiling=config.use_tiling,
            tile_sample_size=config.tile_sample_size, tile_overlap=config.tile_overlap,
        )
        kwargs.update(overrides)
        return cls(device=device, **kwargs)

    def _load(self, path: str, dtype: torch.dtype, device: torch.device) -> str:
        file = ckpt.resolve_weights_file(path, self.version)
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        ckpt.check_shapes(expected, ckpt.read_shapes(file), file, self.arch)
        self.load_state_dict(ckpt.read_tensors(file, dtype, device), strict=True, assign=True)
        return file

    def official_state_dict(self) -> dict:
        """The state dict under the names of the official file (`decoder.conv_out.*` without `.conv`)."""
        return {ckpt.module_to_disk_key(k): v for k, v in self.state_dict().items()}

    def set_tiling(self, enabled: bool = True, tile_sample_size: Optional[int] = None,
                   tile_overlap: Optional[int] = None) -> None:
        """Switch spatial tiling; sizes are in pixels and multiples of the spatial factor."""
        size = tile_sample_size if tile_sample_size is not None else self.tile_sample_size
        overlap = tile_overlap if tile_overlap is not None else self.tile_overlap
        s = self.spatial_factor
        if size <= 0 or size % s or overlap < 0 or overlap % s or overlap >= size:
            raise VAEConfigError(
                f"tile_sample_size {size} / tile_overlap {overlap}: both must be multiples of {s} (the "
                f"version-{self.version} spatial factor), with 0 <= tile_overlap < tile_sample_size "
                f"(e.g. 256 and 64)."
            )
        self.use_tiling = bool(enabled)
        self.tile_sample_size = int(size)
        self.tile_overlap = int(overlap)

    def enable_tiling(self, tile_sample_size: Optional[int] = None, tile_overlap: Optional[int] = None) -> None:
        self.set_tiling(True, tile_sample_size, tile_overlap)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.conv.weight.device

    # ---- shape rules -------------------------------------------------------------------------

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a video of `num_frames` accepted frames."""
        full, rest = divmod(num_frames, self.frame_len)
        return full * self.latent_len + (0 if rest == 0 else (rest - 1) // self.temporal_factor + 1)

    def video_frames(self, num_latents: int) -> int:
        """Frames decoded from `num_latents` latent frames."""
        full, rest = divmod(num_latents, self.latent_len)
        return full * self.frame_len + (0 if rest == 0 else (rest - 1) * self.temporal_factor + 1)

    def _check_video(self, video: torch.Tensor) -> None:
        what = f"StepVideo VAE v{self.version} encode"
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise VAEInputError(f"{what}: video must be a 5-D tensor (b, T, 3, H, W) in [-1, 1], got {shape}.")
        b, t, c, h, w = video.shape
        if c != 3:
            raise VAEInputError(
                f"{what}: video has {c} channels on axis 2 (shape {tuple(video.shape)}); expected 3 (RGB) in the "
                f"layout (b, T, 3, H, W) with frames before channels."
            )
        if not video.is_floating_point():
            raise VAEInputError(f"{what}: video dtype {video.dtype}; expected floating point values in [-1, 1].")
        rest = t % self.frame_len
        partial = [1 + k * self.temporal_factor for k in range(self.latent_len - 1)]
        if t == 0 or (rest and rest not in partial):
            raise VAEInputError(
                f"{what}: {t} frames is not a whole number of chunks. Accepted frame counts are "
                f"{self.frame_len}*k + r with r in {[0] + partial} ({self.frame_len}-frame chunks of "
                f"{self.latent_len} latents, plus optionally one shorter chunk of 1 + {self.temporal_factor}*m "
                f"frames), e.g. 1, {self.frame_len}, {2 * self.frame_len}; trim or pad the video."
            )
        s = self.spatial_factor
        if h % s or w % s or h == 0 or w == 0:
            raise VAEInputError(
                f"{what}: frame size {h}x{w} (H x W) is not divisible by {s}, the version-{self.version} spatial "
                f"factor; accepted sizes are positive multiples of {s} (e.g. 544x992). Resize or crop the video."
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        what = f"StepVideo VAE v{self.version} decode"
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise VAEInputError(f"{what}: latents must be a 5-D tensor (b, t, {self.z_channels}, h, w), got {shape}.")
        b, t, c, h, w = latents.shape
        if c != self.z_channels:
            raise VAEInputError(
                f"{what}: latents have {c} channels on axis 2 (shape {tuple(latents.shape)}); this VAE has "
                f"z_channels={self.z_channels} and takes (b, t, {self.z_channels}, h, w), frames before channels."
            )
        if t == 0 or h == 0 or w == 0 or b == 0:
            raise VAEInputError(f"{what}: latents {tuple(latents.shape)} are empty; t, h and w must be positive.")
        if not latents.is_floating_point():
            raise VAEInputError(f"{what}: latents dtype {latents.dtype}; expected floating point.")

    # ---- encode ------------------------------------------------------------------------------

    def _encode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.use_tiling:
            # Tile the (H, W) axes of (b, T, 3, H, W); each tile gives moments of its 1/s size.
            return tiled_apply(chunk, self.encoder, self.tile_sample_size, self.tile_overlap,
                               Fraction(1, self.spatial_factor))
        return self.encoder(chunk)

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """Raw encoder output (b, t, 2z, h, w) of all chunks: channels [0, z) mean, [z, 2z) logvar (unclamped)."""
        self._check_video(video)
        video = video.to(device=self.device, dtype=self.dtype)
        return torch.cat([self._encode_chunk(c) for c in video.split(self.frame_len, dim=1)], dim=1)

    def latent_shape(self, video_shape: Sequence[int]) -> Tuple[int, ...]:
        """The latent shape (b, t, z, h, w) that `encode` gives for a video of shape (b, T, 3, H, W)."""
        b, t, _, h, w = video_shape
        s = self.spatial_factor
        return (b, self.latent_frames(t), self.z_channels, h // s, w // s)

    @torch.no_grad()
    def encode_distribution(self, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The posterior of `video` (b, T, 3, H, W): (mean, std), each (b, t, z, h, w) in the VAE's dtype, with
        std = exp(logvar / 2), logvar clamped to [-30, 20]. Deterministic: `encode` is `sample(*this, generator)`."""
        mean, logvar = self.encode_moments(video).chunk(2, dim=2)
        return mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))

    @staticmethod
    def draw_eps(shape: Sequence[int], generator: Optional[torch.Generator] = None,
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The N(0, 1) draw of `sample` for latents of `shape`: float32, on the generator's device (else `device`).
        Drawn before the posterior is computed, it is the same draw: the encoder uses no random numbers."""
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)

    @staticmethod
    def sample(mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator] = None,
               eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * eps, eps from `draw_eps(mean.shape, generator)` unless given."""
        if eps is None:
            eps = StepVideoVAE.draw_eps(mean.shape, generator, mean.device)
        return mean + std * eps.to(device=mean.device, dtype=mean.dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Video (b, T, 3, H, W) in [-1, 1] -> latents (b, t, z, h, w).

        `sample=True` (the official behaviour) draws mean + std * eps, eps ~ N(0, 1) from
        `generator` (or the global RNG) in float32, one draw for the whole latent tensor;
        `sample=False` returns the posterior mean. Equal, bit for bit and in the generator's use, to
        `sample(*encode_distribution(video), generator)`.
        """
        if not sample:
            return self.encode_moments(video).chunk(2, dim=2)[0].contiguous()
        return self.sample(*self.encode_distribution(video), generator=generator)

    # ---- decode ------------------------------------------------------------------------------

    def _decode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.use_tiling:
            s = self.spatial_factor
            return tiled_apply(chunk, self.decoder, self.tile_sample_size // s, self.tile_overlap // s,
                               Fraction(s))
        return self.decoder(chunk)

    def _resolve_group(self, group):
        if isinstance(group, str) and group == _AUTO:
            group = self.decode_group
        if isinstance(group, str):
            if group != _AUTO:
                raise VAEConfigError(f"decode group {group!r}: use 'auto', None or a torch.distributed group.")
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
                return None
            return dist.group.WORLD
        if group is None:
            return None
        return group if dist.get_world_size(group) > 1 else None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, group=_AUTO) -> torch.Tensor:
        """Latents (b, t, z, h, w) -> video (b, T, 3, H, W), T = video_frames(t).

        `group`: "auto" (default: this VAE's `decode_group`, itself "auto" = the whole world when
        torch.distributed has more than one rank), None (decode everything locally), or a process
        group whose ranks all hold the same latents and each decode a contiguous share of chunks.
        """
        self._check_latents(latents)
        latents = latents.to(device=self.device, dtype=self.dtype)
        chunks = list(latents.split(self.latent_len, dim=1))
        group = self._resolve_group(group)
        if group is None:
            b, t, _, h, w = latents.shape
            s = self.spatial_factor
            video = latents.new_empty((b, self.video_frames(t), 3, h * s, w * s))
            offset = 0
            for chunk in chunks:  # written chunk by chunk: the output is held once
                out = self._decode_chunk(chunk)
                video[:, offset:offset + out.shape[1]] = out
                offset += out.shape[1]
                del out
        else:
            video = self._decode_parallel(latents, chunks, group)
        return self.mix(video)

    def _decode_parallel(self, latents: torch.Tensor, chunks: List[torch.Tensor], group) -> torch.Tensor:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        _check_same_latents(latents, group)
        per_rank = -(-len(chunks) // world)
        frames = [self.video_frames(c.shape[1]) for c in chunks]
        b, _, _, h, w = latents.shape
        s = self.spatial_factor
        mine = chunks[rank * per_rank:(rank + 1) * per_rank]
        buffer = latents.new_zeros((b, per_rank * self.frame_len, 3, h * s, w * s))
        offset = 0
        for chunk in mine:
            out = self._decode_chunk(chunk)
            buffer[:, offset:offset + out.shape[1]] = out
            offset += out.shape[1]
            del out
        gathered = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(gathered, buffer, group=group)
        del buffer
        parts = []
        for r in range(world):
            count = sum(frames[r * per_rank:(r + 1) * per_rank])
            if count:
                parts.append(gathered[r][:, :count])
        return torch.cat(parts, dim=1)

    def mix(self, video: torch.Tensor) -> torch.Tensor:
        """Blend each chunk boundary in place: with front = last frame of chunk k and back = first of
        chunk k+1, back = 0.6 back + 0.4 front, then front = 0.6 front + 0.4 back (the new back)."""
        n = video.shape[1]
        front = slice(self.frame_len - 1, n - 1, self.frame_len)
        back = slice(self.frame_len, n, self.frame_len)
        mix_scale = 1.0 - MIX_REMAIN
        video[:, back] = video[:, back] * MIX_REMAIN + video[:, front] * mix_scale
        video[:, front] = video[:, front] * MIX_REMAIN + video[:, back] * mix_scale
        return video

    def forward(self, video: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.encode(video, sample=sample, generator=generator)


def _check_same_latents(latents: torch.Tensor, group) -> None:
    """Chunk-parallel decode needs identical latents on every rank of the group; check shape and a checksum."""
    x = latents.detach().double()
    weights = torch.sin(torch.arange(x.numel(), device=x.device, dtype=torch.float64)).view(x.shape)
    probe = torch.tensor([*x.shape, float(x.sum()), float((x * weights).sum())], dtype=torch.float64,
                         device=latents.device)
    probes = [torch.empty_like(probe) for _ in range(dist.get_world_size(group))]
    dist.all_gather(probes, probe, group=group)
    if any(not torch.equal(p, probes[0]) for p in probes):
        shapes = [tuple(int(v) for v in p[:5].tolist()) for p in probes]
        raise VAEInputError(
            f"StepVideo VAE chunk-parallel decode: the ranks of the decode group hold different latents "
            f"(shapes by rank: {shapes}). Every rank must pass the same latents; to decode per-rank latents "
            f"(e.g. data-parallel inference), call decode(latents, group=None)."
        )


def _validate_arch(version: int, z_channels: int, encoder_ch: int, encoder_ch_mult, decoder_ch: int,
                   decoder_ch_mult, num_res_blocks: int) -> None:
    if version not in (1, 2):
        raise VAEConfigError(f"version {version} is not 1 (vae.safetensors) or 2 (vae_v2.safetensors).")
    if z_channels < 1 or num_res_blocks < 1 or encoder_ch < 1 or decoder_ch < 1:
        raise VAEConfigError("z_channels, num_res_blocks, encoder_ch and decoder_ch must be positive.")
    for name, mult in (("encoder_ch_mult", encoder_ch_mult), ("decoder_ch_mult", decoder_ch_mult)):
        if len(mult) != NUM_LEVELS or any(m < 1 for m in mult):
            raise VAEConfigError(f"{name} {tuple(mult)} must have {NUM_LEVELS} positive entries (the official "
                                 f"four resolution levels), e.g. (4, 8, 16, 16) / (1, 2, 4, 4).")
    widths = [encoder_ch] + [encoder_ch * m for m in encoder_ch_mult] + [decoder_ch * m for m in decoder_ch_mult]
    if any(w % 32 for w in widths):
        raise VAEConfigError(f"every width (encoder_ch, encoder_ch*mult, decoder_ch*mult) must be a multiple of 32, "
                             f"the GroupNorm group count; got {widths}.")
    if version == 2:
        for name, block_in in (("encoder", encoder_ch * encoder_ch_mult[-1]), ("decoder", decoder_ch *
                                                                                  decoder_ch_mult[-1])):
            if (8 * block_in) % patch_channels(z_channels):
                raise VAEConfigError(
                    f"version 2 {name}: the patchify shortcut needs 8 x last width ({8 * block_in}) divisible by "
                    f"32 x z_channels ({patch_channels(z_channels)}); lower z_channels or widen the last level.")
