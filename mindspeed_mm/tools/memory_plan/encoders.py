"""The frozen encoders of raw-video training (Video-VAE, step_llm, HunyuanCLIP) and the VAE's shape rules.

Arithmetic only. Parameter counts come from the weights' config files when the planner can read them (the CLI does
that), else from the released models, whose numbers are written here with where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

# The released Video-VAE v2 (`vae/vae_v2.safetensors`, official widths), counted on the real module (meta device).
RELEASED_VAE_PARAMETERS = 498_818_819
# RSS growth of one untiled float32 encode of a 17 x 256 x 256 chunk on CPU, 1.94 GiB (docs/performance.md, Video-VAE):
# bytes per input pixel and frame at 4 bytes per element. It scales with the chunk's pixels (the 17 x 544 x 992
# extrapolation there is 16.0 GiB) and with the element size. An estimate on accelerators: convolution workspaces
# differ.
VAE_ENCODE_BYTES_PER_PIXEL_FP32 = 1.94 * 2**30 / (17 * 256 * 256)


@dataclass(frozen=True)
class VAEShape:
    """The chunking and compression of the StepVideo Video-VAE (the `ae` section)."""

    version: int = 2
    frame_len: int = 17

    @property
    def spatial_factor(self) -> int:
        return 16 if self.version == 2 else 8

    @property
    def temporal_factor(self) -> int:
        return 8 if self.version == 2 else 4

    @property
    def latent_len(self) -> int:
        return (self.frame_len - 1) // self.temporal_factor + 1

    def frames_problem(self, num_frames: int) -> Optional[str]:
        """Why the VAE cannot encode `num_frames` frames, or None."""
        rest = num_frames % self.frame_len
        partial = [1 + k * self.temporal_factor for k in range(self.latent_len - 1)]
        if num_frames <= 0 or (rest and rest not in partial):
            return (f"{num_frames} frames is not a whole number of {self.frame_len}-frame VAE chunks (accepted: "
                    f"{self.frame_len}*k + r with r in {[0] + partial})")
        return None

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a video: each `frame_len`-frame chunk gives `latent_len` latents (17 -> 3 in v2), a
        shorter last chunk of 1 + 8m frames gives 1 + m."""
        full, rest = divmod(num_frames, self.frame_len)
        return full * self.latent_len + (0 if rest == 0 else (rest - 1) // self.temporal_factor + 1)

    def size_problem(self, height: int, width: int) -> Optional[str]:
        f = self.spatial_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            return f"frame size {height}x{width} is not a multiple of the VAE's spatial factor {f}"
        return None

    def latent_size(self, height: int, width: int) -> Tuple[int, int]:
        return height // self.spatial_factor, width // self.spatial_factor


def vae_encode_working_bytes(vae: VAEShape, batch: int, height: int, width: int, element_bytes: int,
                             tile: Optional[int] = None) -> int:
    """Working memory of encoding one chunk (the VAE encodes chunk by chunk without autograd); with spatial tiling
    the chunk is encoded tile by tile, so the tile's area counts, not the frame's."""
    area = height * width if tile is None else min(tile, height) * min(tile, width)
    return int(VAE_ENCODE_BYTES_PER_PIXEL_FP32 * batch * vae.frame_len * area * element_bytes / 4)


# Decoding one 17-frame chunk (the VAE decodes chunk by chunk without autograd), float32, above the weights.
# Untiled: docs/performance.md (Video-VAE) extrapolates 23.7 GiB for a 17 x 544 x 992 chunk from CPU RSS measured at
# up to 17 x 256 x 256 (2.88 GiB there) with the lower-bound settings; it scales with the frame's pixels.
VAE_DECODE_BYTES_PER_PIXEL_FP32 = 23.7 * 2**30 / (17 * 544 * 992)
# Tiled with the default 256/64-px window: the review's measurement at real size (17 x 544 x 992, float32, the
# defaults), about 4.1 GiB above the weights (docs/performance.md, Video-VAE). Tiles bound it, so it does not grow
# with the frame; other tile sizes are scaled by the tile's area.
VAE_DECODE_TILED_BYTES_FP32 = 4.1 * 2**30
VAE_DECODE_MEASURED_TILE = 256


def vae_decode_working_bytes(vae: VAEShape, batch: int, height: int, width: int, element_bytes: int,
                             tile: Optional[int] = None) -> int:
    """Working memory of decoding one chunk, an estimate from float32 CPU figures scaled by the element size (half in
    bf16; convolution workspaces on accelerators differ). With spatial tiling, the measured tiled figure for a
    256-px tile (scaled by the tile's area), or the untiled one when the frame is smaller."""
    untiled = VAE_DECODE_BYTES_PER_PIXEL_FP32 * batch * vae.frame_len * height * width
    if tile is not None:
        tile_area = min(tile, height) * min(tile, width)
        tiled = VAE_DECODE_TILED_BYTES_FP32 * batch * tile_area / VAE_DECODE_MEASURED_TILE ** 2
        untiled = min(untiled, tiled)
    return int(untiled * element_bytes / 4)


# --- text encoders --------------------------------------------------------------------------


@dataclass(frozen=True)
class StepLLMShape:
    """Step-LLM's shape (`step_llm/config.json`). Defaults: the released file (hidden 6144, 48 layers, 48 heads,
    8 KV groups, FFN 16896, vocabulary 65536), whose safetensors index states 39,159,201,792 bytes in bf16."""

    hidden_size: int = 6144
    num_layers: int = 48
    num_attention_heads: int = 48
    num_attention_groups: int = 8
    ffn_hidden_size: int = 16896
    padded_vocab_size: int = 65536

    @property
    def ffn_inner(self) -> int:
        return 256 * -(-self.ffn_hidden_size // 256)  # rounded up to a multiple of 256, as the model does

    def layer_parameters(self) -> int:
        h = self.hidden_size
        head_dim = h // self.num_attention_heads
        attention = h * (h + 2 * self.num_attention_groups * head_dim) + h * h  # wqkv, wo
        ffn = h * 2 * self.ffn_inner + self.ffn_inner * h  # w1 (gate | linear), w2
        return attention + ffn + 2 * h

    def parameters(self) -> int:
        return self.padded_vocab_size * self.hidden_size + self.num_layers * self.layer_parameters()

    def device_parameters(self, layerwise_offload: bool = False) -> int:
        """On the device: all of them, or with text_encoder_layerwise_offload the embedding and two layers (the
        running one and the prefetched next, models/common/offload.py)."""
        if not layerwise_offload:
            return self.parameters()
        return self.parameters() - (self.num_layers - 2) * self.layer_parameters()

    def forward_working_bytes(self, batch: int, tokens: int, element_bytes: int) -> int:
        """One layer's forward without autograd: the SwiGLU's (b, L, 2 x inner) projection and its product, the
        residual stream, and the (b, heads, L, L) float32 attention bias and scores."""
        inner = self.ffn_inner
        return (element_bytes * batch * tokens * (3 * inner + 4 * self.hidden_size)
                + 2 * 4 * batch * self.num_attention_heads * tokens * tokens)


@dataclass(frozen=True)
class BertShape:
    """HunyuanCLIP's BERT (`hunyuan_clip/clip_text_encoder/config.json`). Defaults: the released encoder, a
    chinese-roberta-wwm-ext-large (24 layers, hidden 1024, FFN 4096, vocabulary 47020, 512 positions)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    vocab_size: int = 47020
    max_position_embeddings: int = 512
    type_vocab_size: int = 2

    def parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        pooler = h * h + h  # transformers' BertModel builds the pooler by default
        return embeddings + self.num_hidden_layers * layer + pooler

    def forward_working_bytes(self, batch: int, tokens: int, element_bytes: int) -> int:
        return (element_bytes * batch * tokens * (2 * self.intermediate_size + 4 * self.hidden_size)
                + 2 * 4 * batch * self.num_attention_heads * tokens * tokens)
