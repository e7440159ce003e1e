"""Core attention behind one small interface, with one backend per device family.

    attention(q, k, v, mask=None, backend="auto", scale=None) -> out

q, k, v and out are [b, s, n, d] ("bsnd", the layout the seed's `fa_layout` names).
`mask` is boolean with True = attend, the convention everywhere in this project. It is either
a key-padding mask [b, s_k] or a full mask [b, s_q, s_k]. Backends that want the opposite
polarity convert at this boundary and nowhere else.

Backends:
- "sdpa": torch.nn.functional.scaled_dot_product_attention; runs everywhere. The default.
- "flash": flash-attn's `flash_attn_func` when installed and the tensors are on CUDA in
  fp16/bf16; masked calls fall back to "sdpa", since flash-attn has no dense mask argument.
- "npu": torch_npu's `npu_fusion_attention`. Its `atten_mask` uses the opposite polarity:
  **True = masked out (drop)**, so the mask is inverted here. It cannot run without an NPU.
- "auto": "npu" on NPU tensors, "flash" on CUDA when flash-attn imports, else "sdpa".

Key-padding masks with right padding (the DiT's text keys, the CP padding) never reach a backend as masks: see
`attention`.
"""

from __future__ import annotations

import functools
import importlib
from typing import List, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash", "npu")


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """flash-attn's function, looked up once per process (an import attempt per attention call costs)."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except Exception:
        return None


def _as_full_mask(mask: torch.Tensor, s_q: int) -> torch.Tensor:
    """[b, s_k] or [b, s_q, s_k] boolean -> [b, 1, s_q, s_k] boolean (True = attend)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be boolean (True = attend), got {mask.dtype}")
    if mask.dim() == 2:
        return mask[:, None, None, :].expand(-1, 1, s_q, -1)
    if mask.dim() == 3:
        return mask[:, None]
    raise ValueError(f"attention mask must be [b, s_k] or [b, s_q, s_k], got shape {tuple(mask.shape)}")


def sdpa_attention(q, k, v, mask=None, scale=None):
    attn_mask = None if mask is None else _as_full_mask(mask, q.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


def flash_attention(q, k, v, mask=None, scale=None):
    func = _flash_attn_func()
    if func is None or mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(q, k, v, mask, scale)
    return func(q, k, v, softmax_scale=scale)


def npu_attention(q, k, v, mask=None, scale=None):
    import torch_npu

    heads, head_dim = q.shape[2], q.shape[3]
    drop_mask = None
    if mask is not None:
        # npu_fusion_attention: True means "do not attend" -- the opposite of ours.
        drop_mask = ~_as_full_mask(mask, q.shape[1])
    return torch_npu.npu_fusion_attention(
        q, k, v, heads,
        input_layout="BSND",
        atten_mask=drop_mask,
        scale=scale if scale is not None else head_dim ** -0.5,
        keep_prob=1.0,
    )[0]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "npu":
        return "npu"
    if device.type == "cuda" and _flash_attn_func() is not None:
        return "flash"
    return "sdpa"


_IMPLS = {"sdpa": sdpa_attention, "flash": flash_attention, "npu": npu_attention}


def key_lengths(mask: torch.Tensor) -> Optional[List[int]]:
    """Each sample's number of keys when a [b, s_k] mask is a prefix of Trues per sample (right padding, as the
    text keys and the CP padding are), else None. One host sync."""
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be boolean (True = attend), got {mask.dtype}")
    lengths = mask.sum(dim=1)
    prefix = (mask == (torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None])).all()
    *counts, ok = torch.cat([lengths, prefix.long()[None]]).tolist()
    return counts if ok else None


def attention(q, k, v, mask: Optional[torch.Tensor] = None, backend: str = "auto", scale=None):
    """Scaled dot-product attention over [b, s, n, d] tensors; see the module docstring.

    A key-padding mask with right padding runs as variable-length attention without a mask: the keys cut to each
    sample's length (one call when every sample has the same length, else one per sample), so every backend takes
    its mask-free kernel (flash-attn and the NPU kernel included) and skips the padded keys' work. Equal to the
    masked call; under torch.compile the masked call runs (the lengths would need a host sync in the graph)."""
    name = resolve_backend(backend, q.device)
    impl = _IMPLS[name]
    if mask is not None and mask.dim() == 2 and not torch.compiler.is_compiling():
        lengths = key_lengths(mask)
        if lengths is not None and min(lengths) > 0:
            # the NPU kernel takes dense BSND inputs; the others take the cut views as they are
            cut = (lambda t: t.contiguous()) if name == "npu" else (lambda t: t)
            if len(set(lengths)) == 1:
                n = lengths[0]
                return impl(q, cut(k[:, :n]), cut(v[:, :n]), None, scale)
            return torch.cat([impl(q[i:i + 1], cut(k[i:i + 1, :n]), cut(v[i:i + 1, :n]), None, scale)
                              for i, n in enumerate(lengths)])
    return impl(q, k, v, mask, scale)
