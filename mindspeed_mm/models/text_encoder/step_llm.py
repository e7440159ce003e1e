"""Step-LLM, the 6144-wide text encoder of StepVideo, in plain PyTorch.

The official model runs its attention through a closed binary kernel (sm80/86/90 only). The
math is causal GQA with an ALiBi-like bias whose distance term is a square root:
bias[h, i, j] = -sqrt(i - j) * slope_h for keys j <= i, and a large negative value above the
diagonal (MindSpeed-MM's open re-implementation, which the golden case pins down). Here that is
scaled_dot_product_attention with an additive bias, so it runs on any device.

Layout, as in the released checkpoint: token embedding (no positions) -> N pre-norm blocks
(RMSNorm -> GQA attention `wqkv`/`wo`; RMSNorm -> SwiGLU `w1`/`w2`) -> the last block's output.
There is no final norm and no LM head. The padding mask is accepted and ignored: attention is
purely causal and padding sits at the end, so real tokens never see it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...config.base import ConfigError
from ...checkpoint.safetensors_io import load_sharded_safetensors, read_json_file, shard_map
from ..registry import register_model
from ...checkpoint.official_layout import require_file, require_path

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Large negative fill above the diagonal, as in the reference (float16's minimum).
_MASKED = -65504.0


@dataclass
class StepLLMConfig:
    """The keys of `step_llm/config.json` that the model reads (others are ignored)."""

    hidden_size: int
    num_attention_heads: int
    num_attention_groups: int
    num_layers: int
    ffn_hidden_size: int
    padded_vocab_size: int
    layernorm_epsilon: float = 1e-5
    seq_length: int = 320
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    fp32_residual_connection: bool = False
    embedding_weights_in_fp32: bool = False

    REQUIRED = ("hidden_size", "num_attention_heads", "num_attention_groups", "num_layers",
                "ffn_hidden_size", "padded_vocab_size")

    @classmethod
    def from_json(cls, path: str) -> "StepLLMConfig":
        raw = read_json_file(path, "Step-LLM text encoder")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object (the config.json of step_llm/), got "
                              f"{type(raw).__name__}.")
        missing = [k for k in cls.REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"{path} lacks required key(s) {', '.join(missing)} of a Step-LLM config.json; use "
                              f"the config.json of step_llm/ from the official download.")
        names = {f for f in cls.__dataclass_fields__}
        config = cls(**{k: v for k, v in raw.items() if k in names})
        config.validate(path)
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_inner_size(self) -> int:
        # The FFN width is rounded up to a multiple of 256, as in the released model.
        return 256 * math.ceil(self.ffn_hidden_size / 256)

    def validate(self, source: str = "step_llm config") -> None:
        for key in self.REQUIRED:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}.")
        if self.num_attention_heads % self.num_attention_groups:
            raise ConfigError(f"{source}: num_attention_heads {self.num_attention_heads} is not divisible by "
                              f"num_attention_groups {self.num_attention_groups}.")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes: geometric in 2^(-8/n) for the largest power of two n <= heads, then odd powers of 2^(-4/n)."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = torch.pow(torch.tensor(2.0 ** (-8.0 / n)), torch.arange(1, n + 1, dtype=torch.float32))
    if n < num_heads:
        extra = torch.pow(torch.tensor(2.0 ** (-4.0 / n)),
                          torch.arange(1, 2 * (num_heads - n), 2, dtype=torch.float32))
        slopes = torch.cat([slopes, extra])
    return slopes


def sqrt_alibi_bias(seq_len: int, num_heads: int, device=None) -> torch.Tensor:
    """Additive attention bias (heads, L, L) in float32: -sqrt(i-j)*slope for j <= i, masked above."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    distance = pos[:, None] - pos[None, :]
    causal = distance >= 0
    bias = -torch.sqrt(distance.clamp(min=0))[None] * alibi_slopes(num_heads).to(device)[:, None, None]
    return bias.masked_fill(~causal[None], _MASKED)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the normalisation computed in float32 and cast back first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.heads, self.groups = config.num_attention_heads, config.num_attention_groups
        self.head_dim = config.head_dim
        # Rows: all query heads, then per KV group a [k | v] pair of head_dim rows each.
        self.wqkv = nn.Linear(config.hidden_size, config.hidden_size + 2 * self.groups * self.head_dim, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, kv = self.wqkv(x).split([self.heads * self.head_dim, 2 * self.groups * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(b, s, self.groups, 2 * self.head_dim).chunk(2, dim=-1)
        per_group = self.heads // self.groups
        # Query head h reads KV group h // per_group.
        k = k.transpose(1, 2).repeat_interleave(per_group, dim=1)
        v = v.transpose(1, 2).repeat_interleave(per_group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        inner = config.ffn_inner_size
        self.w1 = nn.Linear(config.hidden_size, 2 * inner, bias=False)  # [gate | linear]
        self.w2 = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * value)


class StepLLMBlock(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.attention = GroupedQueryAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.feed_forward = SwiGLU(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # With fp32_residual_connection the stream stays fp32 and each sublayer runs in the
        # weights' dtype, as the official code does under autocast.
        compute = self.attention.wqkv.weight.dtype
        x = x + self.attention(self.attention_norm(x).to(compute), bias).to(x.dtype)
        return x + self.feed_forward(self.ffn_norm(x).to(compute)).to(x.dtype)


class _Embedding(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class _Layers(nn.Module):
    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(StepLLMBlock(config) for _ in range(config.num_layers))


@register_model("StepLLmModel")
class StepLLMEncoder(nn.Module):
    """Step-LLM: token ids (b, L) -> last hidden state (b, L, hidden). Parameter names are the checkpoint's."""

    def __init__(self, config: StepLLMConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = _Embedding(config)
        self.transformer = _Layers(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: Union[str, torch.dtype, None] = torch.bfloat16,
                        device: Union[str, torch.device, None] = None) -> "StepLLMEncoder":
        """Load `step_llm/` (config.json + index + shards, or one model.safetensors), strictly, shard by shard."""
        from ...config.model import torch_dtype

        what = "Step-LLM text encoder"
        require_path(folder, what, is_dir=True)
        config = StepLLMConfig.from_json(require_file(folder, CONFIG_NAME, what))
        dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
        with torch.device("meta"):
            model = cls(config)
        files = shard_map(folder, INDEX_NAME, SINGLE_NAME, what)
        load_sharded_safetensors(model, files, source=folder, dtype=dtype, device=device or "cpu", what=what)
        if config.embedding_weights_in_fp32:
            model.tok_embeddings.float()
        return model.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(b, L) ids -> (b, L, hidden). `attention_mask` is accepted and unused (attention is causal)."""
        x = self.tok_embeddings.word_embeddings(input_ids)
        compute = self.transformer.layers[0].attention.wqkv.weight.dtype if len(self.transformer.layers) else x.dtype
        x = x.float() if self.config.fp32_residual_connection else x.to(compute)
        x = self.dropout(x)
        bias = sqrt_alibi_bias(input_ids.shape[1], self.config.num_attention_heads, device=input_ids.device)
        for layer in self.transformer.layers:
            x = layer(x, bias)
        return x


def save_step_llm(model: StepLLMEncoder, folder: str, num_shards: int = 1) -> None:
    """Write `model` in the official layout: config.json + model-0000k-of-0000n.safetensors + index."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = {k: getattr(model.config, k) for k in model.config.__dataclass_fields__}
    config.update({"params_dtype": "bfloat16", "use_flash_attn": True})
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    keys = list(state)
    if num_shards <= 1:
        save_file(state, os.path.join(folder, SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    per = math.ceil(len(keys) / num_shards)
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
