"""Building blocks of the StepVideo DiT (reference §1), plain: `nn.Linear` layers, one device, all heads.

`parallelize.parallelize_stepvideo` applies the parallel plan afterwards: it swaps the planned linears for
Megatron's column/row layers, the self-attention core for Ulysses/ring, and sets the tensor-parallel group of the
q/k norms, the TP dropout of the FFN and the blocks' `ParallelState` (what `tp_shared` and `layer_norm` read, both
identities in a plain model). The math below does not change: heads per rank follow from the tensors' widths.

Tensors are "bsnd" inside attention: (batch, sequence, heads, head_dim). Parameter names
follow MindSpeed-MM (see state_dict_adapter.py for the official names).

The fused elementwise path (each module's `fused`, on by default; `StepVideoDiT.fused_elementwise` sets them all):
RoPE as one concatenation and one multiply-add over the whole head (instead of split / negate / concatenate and
two multiplies per axis), RMSNorm through `F.rms_norm` on the float32 copy, and the modulation and gated residuals as
`addcmul` (one pass instead of two). Same math; in bf16 `addcmul` rounds once where the op-by-op chain rounds twice.
`fused = False` is the official op-by-op order (tests compare the two).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mindspeed_mm.models.common.attention import attention

from .parallelize import ParallelState, linear, tp_shared

# LayerNorm eps of the blocks' norm1/norm2 (nn.LayerNorm's default in the official blocks).
BLOCK_NORM_EPS = 1e-5
TIMESTEP_CHANNELS = 256
ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 and cast back (as official).

    The q/k norms act per head, and under TP each rank holds only its heads: the weight's
    gradient on one rank covers only those heads. When the plan sets `_tp_group` (TP > 1) the weight passes
    through Megatron's copy-to-TP-region (identity forward, all-reduce backward), so every
    TP rank ends up with the full gradient, like every other replicated parameter.
    """

    def __init__(self, dim: int, eps: float, elementwise_affine: bool, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.fused = True
        self._tp_group = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.fused:
            out = F.rms_norm(xf, (xf.shape[-1],), eps=self.eps).type_as(x)
        else:
            out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if self.weight is None:
            return out
        weight = self.weight
        if self._tp_group is not None:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            weight = copy_to_tensor_model_parallel_region(weight, group=self._tp_group)
        return out * weight


# --- rotary position embedding (3D) ---------------------------------------------------------


def rope_cos_sin(token_start: int, count: int, frames: int, height: int, width: int, channel_split: Sequence[int],
                 dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (count, head_dim) for the tokens [token_start, token_start + count) of the frame-major
    sequence of frames*height*width tokens.

    Axis i (frame, row, column) rotates its own channel_split[i] channels with
    inv_freq = 1/theta^(arange(0, D_i, 2)/D_i). The angles are cast to `dtype` before cos/sin,
    as the official code does (a bf16 rounding in bf16 runs). Token indices past the sequence (the pad tokens
    of the context/sequence-parallel split) get the last token's position; their results are never used.
    """
    index = torch.arange(token_start, token_start + count, device=device).clamp(max=frames * height * width - 1)
    positions = (index // (height * width), (index // width) % height, index % width)
    cos, sin = [], []
    for axis, dim in enumerate(channel_split):
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device).float() / dim))
        pos = positions[axis].float()
        angles = (pos[:, None] * inv_freq[None, :]).to(dtype)
        angles = torch.cat([angles, angles], dim=-1)
        cos.append(angles.cos())
        sin.append(angles.sin())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


_SIGN_CACHE = {}


def rope_sign(channel_split: Sequence[int], device) -> torch.Tensor:
    """(d,) signs such that `rotate_halves(x) * sign` is each axis's half-split rotation [-x2, x1]."""
    key = (tuple(channel_split), str(device))
    if key not in _SIGN_CACHE:
        sign = []
        for dim in channel_split:
            sign += [-1.0] * (dim // 2) + [1.0] * (dim // 2)
        _SIGN_CACHE[key] = torch.tensor(sign, device=device)
    return _SIGN_CACHE[key]


def rotate_halves(x: torch.Tensor, channel_split: Sequence[int]) -> torch.Tensor:
    """[x2, x1] for every axis's channels, in one concatenation of views (a gather on the last dim is several times
    slower on CPU)."""
    parts, start = [], 0
    for dim in channel_split:
        half = dim // 2
        parts += [x[..., start + half:start + dim], x[..., start:start + half]]
        start += dim
    return torch.cat(parts, dim=-1)


def apply_rope_fused(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, channel_split: Sequence[int]):
    """`apply_rope` as one concatenation and one multiply-add; signed_sin = sin * `rope_sign`."""
    return torch.addcmul(x * cos[None, :, None, :], rotate_halves(x, channel_split), signed_sin[None, :, None, :])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, channel_split: Sequence[int]) -> torch.Tensor:
    """Rotate x (b, s, n, d) with per-axis half-split rotation; cos/sin are (s, d). The official op order."""
    out = []
    split = list(channel_split)
    for xc, c, s in zip(x.split(split, dim=-1), cos.split(split, dim=-1), sin.split(split, dim=-1)):
        half = xc.shape[-1] // 2
        rotated = torch.cat([-xc[..., half:], xc[..., :half]], dim=-1)
        out.append(xc * c[None, :, None, :] + rotated * s[None, :, None, :])
    return torch.cat(out, dim=-1)


# --- timestep, motion-score and text embeddings ---------------------------------------------


def timestep_sinusoid(t: torch.Tensor, channels: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoid (flip_sin_to_cos=True, downscale_freq_shift=0), computed in float32."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class CombinedEmbedding(nn.Module):
    """`adaln_single.emb`: the timestep MLP, plus the motion-score MLP for i2v."""

    def __init__(self, dim: int, motion_score: bool, device=None, dtype=None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim, device, dtype)
        if motion_score:
            self.motion_score_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim, device, dtype)
        else:
            self.motion_score_embedder = None

    def forward(self, scaled_timestep, motion_score=None):
        dtype = self.timestep_embedder.linear_1.weight.dtype
        emb = self.timestep_embedder(timestep_sinusoid(scaled_timestep).to(dtype))
        if self.motion_score_embedder is not None:
            emb = emb + self.motion_score_embedder(timestep_sinusoid(motion_score).to(dtype))
        return emb


class AdaLayerNormSingle(nn.Module):
    """t -> (6D modulation for every block, D-wide embedded timestep). t is scaled by 1000."""

    TIME_STEP_RESCALE = 1000

    def __init__(self, dim: int, motion_score: bool, device=None, dtype=None):
        super().__init__()
        self.emb = CombinedEmbedding(dim, motion_score, device, dtype)
        self.linear = nn.Linear(dim, 6 * dim, bias=True, device=device, dtype=dtype)  # planned: column, gathered

    def forward(self, timestep: torch.Tensor, motion_score: Optional[torch.Tensor] = None):
        embedded = self.emb(timestep * self.TIME_STEP_RESCALE, motion_score)
        return linear(self.linear, F.silu(embedded)), embedded


class TextProjection(nn.Module):
    """`caption_projection`: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_features: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """`pos_embed`: per-frame Conv2d patchify; (n, c, H, W) -> (n, h*w, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x):
        return self.proj(x).to(x.dtype).flatten(2).transpose(1, 2)


# --- attention and feed-forward -------------------------------------------------------------

CoreAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def core_attention_fn(backend: str) -> CoreAttention:
    def fn(q, k, v, key_mask=None):
        return attention(q, k, v, key_mask, backend=backend)

    return fn


class SelfAttention(nn.Module):
    """attn1: fused QKV (column parallel, [Q; K; V]), q/k RMSNorm, 3D RoPE, Ulysses, proj_out (row)."""

    def __init__(self, dim, head_dim, norm_eps, norm_affine, channel_split, core: CoreAttention, device=None,
                 dtype=None):
        super().__init__()
        self.head_dim, self.channel_split = head_dim, list(channel_split)
        self.proj_qkv = nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, norm_eps, norm_affine, device, dtype)
        self.k_norm = RMSNorm(head_dim, norm_eps, norm_affine, device, dtype)
        self.proj_out = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self._core = core  # the plan may wrap it with Ulysses / ring attention over the CP group
        self.fused = True

    def forward(self, x, cos, sin, key_mask=None):
        """x: this rank's tokens (b, s_local, D); key_mask (b, s_cp) marks the real tokens of this CP rank's
        chunk when the split padded it, else None."""
        qkv = linear(self.proj_qkv, x)  # with sequence parallel: all of the CP chunk's tokens
        b, s, _ = qkv.shape
        q, k, v = qkv.chunk(3, dim=-1)
        q = self.q_norm(q.reshape(b, s, -1, self.head_dim))  # this rank's heads: all of them, or 1/TP
        k = self.k_norm(k.reshape(b, s, -1, self.head_dim))
        v = v.reshape(b, s, -1, self.head_dim)
        if self.fused:
            signed_sin = sin * rope_sign(self.channel_split, q.device).to(sin.dtype)  # (s, d): once for q and k
            q = apply_rope_fused(q, cos, signed_sin, self.channel_split)
            k = apply_rope_fused(k, cos, signed_sin, self.channel_split)
        else:
            q = apply_rope(q, cos, sin, self.channel_split)
            k = apply_rope(k, cos, sin, self.channel_split)
        out = self._core(q, k, v, key_mask)
        return linear(self.proj_out, out.reshape(b, s, -1))


class CrossAttention(nn.Module):
    """attn2: local queries against the full (cropped) text; no norm, modulation or gate."""

    def __init__(self, dim, head_dim, norm_eps, norm_affine, core: CoreAttention, device=None, dtype=None):
        super().__init__()
        self.head_dim = head_dim
        self.proj_q = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.proj_kv = nn.Linear(dim, 2 * dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, norm_eps, norm_affine, device, dtype)
        self.k_norm = RMSNorm(head_dim, norm_eps, norm_affine, device, dtype)
        self.proj_out = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self._core = core

    def forward(self, x, text, key_mask):
        q = linear(self.proj_q, x)  # with sequence parallel: all of the CP chunk's tokens
        b, s, _ = q.shape
        q = self.q_norm(q.reshape(b, s, -1, self.head_dim))
        k, v = linear(self.proj_kv, text).chunk(2, dim=-1)
        k = self.k_norm(k.reshape(b, text.shape[1], -1, self.head_dim))
        v = v.reshape(b, text.shape[1], -1, self.head_dim)
        out = self._core(q, k, v, key_mask)
        return linear(self.proj_out, out.reshape(b, s, -1))


class GeluProjection(nn.Module):
    """`ff.net.0`: column-parallel Linear (no bias) then GELU(tanh)."""

    def __init__(self, dim, inner, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return F.gelu(linear(self.proj, x), approximate="tanh")


class FeedForward(nn.Module):
    """`ff`: net.0 (Linear D->4D + GELU tanh), net.1 (dropout), net.2 (Linear 4D->D)."""

    def __init__(self, dim, dropout, device=None, dtype=None):
        super().__init__()
        self.net = nn.ModuleList([
            GeluProjection(dim, 4 * dim, device, dtype),
            nn.Dropout(dropout),
            nn.Linear(4 * dim, dim, bias=False, device=device, dtype=dtype),
        ])
        self._tp_dropout = False  # the plan sets it when the hidden features are TP-sharded

    def forward(self, x):
        hidden = self.net[0](x)
        if self._tp_dropout and self.training:
            # The hidden features are TP-sharded: each TP rank drops different elements.
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                hidden = self.net[1](hidden)
        else:
            hidden = self.net[1](hidden)
        return linear(self.net[2], hidden)


class StepVideoTransformerBlock(nn.Module):
    """AdaLN-modulated self-attention, ungated cross-attention, AdaLN-modulated FFN."""

    def __init__(self, dim: int, head_dim: int, channel_split: List[int], attn_norm_eps: float,
                 attn_norm_affine: bool, dropout: float, core: CoreAttention, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.attn1 = SelfAttention(dim, head_dim, attn_norm_eps, attn_norm_affine, channel_split, core, device, dtype)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.attn2 = CrossAttention(dim, head_dim, attn_norm_eps, attn_norm_affine, core, device, dtype)
        self.ff = FeedForward(dim, dropout, device, dtype)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim, device=device, dtype=dtype) / dim ** 0.5)
        self._state = ParallelState()  # the plan's: sequence parallel reads it
        self.fused = True

    def forward(self, x, text, modulation, key_mask, cos, sin, token_mask=None):
        """key_mask: the text keys' mask; token_mask: the real tokens of the CP chunk (None without padding)."""
        state = self._state
        mod = tp_shared(self.scale_shift_table[None] + modulation.reshape(-1, 6, self.dim), state)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        if not self.fused:  # the official op order
            h = layer_norm(self.norm1, x, state) * (1 + scale_msa) + shift_msa
            x = gate_msa * self.attn1(h, cos, sin, token_mask) + x
            x = self.attn2(x, text, key_mask) + x
            h = layer_norm(self.norm2, x, state) * (1 + scale_mlp) + shift_mlp
            return gate_mlp * self.ff(h) + x
        h = torch.addcmul(shift_msa, layer_norm(self.norm1, x, state), 1 + scale_msa)
        x = torch.addcmul(x, gate_msa, self.attn1(h, cos, sin, token_mask))
        x = self.attn2(x, text, key_mask) + x
        h = torch.addcmul(shift_mlp, layer_norm(self.norm2, x, state), 1 + scale_mlp)
        return torch.addcmul(x, gate_mlp, self.ff(h))


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """`norm(x)`, with its weights' gradient all-reduced over TP under sequence parallel (`tp_shared`)."""
    if not state.sequence_parallel or norm.weight is None:
        return norm(x)
    return F.layer_norm(x, norm.normalized_shape, tp_shared(norm.weight, state), tp_shared(norm.bias, state),
                        norm.eps)
