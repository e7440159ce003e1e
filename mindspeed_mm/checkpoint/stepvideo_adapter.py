"""The one mapping between official StepVideo DiT weights and our (MindSpeed-MM style) layout.

Used by `StepVideoDiT.from_pretrained`, the tiny-weights tool and the checkpoint converter.

Official diffusers-format keys -> ours (reference §7): five renames,

    attn1.wqkv -> attn1.proj_qkv    attn1.wo -> attn1.proj_out
    attn2.wq   -> attn2.proj_q      attn2.wkv -> attn2.proj_kv    attn2.wo -> attn2.proj_out

every other key is unchanged. The fused projections also change row order: official rows
are per head, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (head_dim rows each), ours are grouped,
[Q_all; K_all; V_all] (and [K_all; V_all] for attn2.proj_kv), so that tensor parallel can
give each rank the rows of its heads of every part.

Tensor-parallel sharding follows `parallelize.TP_PLAN`: column layers split rows (fused
layers split each part separately and concatenate the rank's parts), row layers split
weight columns, everything else is copied to every rank.

The official config.json (StepVideoModel constructor keys) maps onto `PredictorConfig`
with `predictor_kwargs_from_official_config`, and back with `official_config_from_predictor`.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import MindSpeedMMError
from .safetensors_io import CheckpointMismatchError
from .stepvideo_layout import TP_FLAG, plan_for_parameter, split_dim


class WeightsLayoutError(MindSpeedMMError, ValueError):
    """Weights or an official config.json that do not fit the DiT layout (head_dim, TP size, required keys);
    the message names the key and the fix."""

OFFICIAL_TO_OURS = (
    ("attn1.wqkv.", "attn1.proj_qkv."),
    ("attn1.wo.", "attn1.proj_out."),
    ("attn2.wq.", "attn2.proj_q."),
    ("attn2.wkv.", "attn2.proj_kv."),
    ("attn2.wo.", "attn2.proj_out."),
)

# Keys of the official config.json that carry no model structure (diffusers bookkeeping).
OFFICIAL_CONFIG_IGNORED = ("attention_type",)


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        marker = "." + old
        if marker in key:
            return key.replace(marker, "." + new, 1)
        if key.startswith(old):
            return new + key[len(old):]
    return key


def official_key_to_ours(key: str) -> str:
    return _rename(key, OFFICIAL_TO_OURS)


def our_key_to_official(key: str) -> str:
    return _rename(key, tuple((b, a) for a, b in OFFICIAL_TO_OURS))


def fused_parts(key: str) -> int:
    """3 for attn1.proj_qkv.weight, 2 for attn2.proj_kv.weight, 1 otherwise (our key names)."""
    plan, leaf = plan_for_parameter(key)
    return plan.fused if plan is not None and leaf == "weight" else 1


# --- per-head fused rows <-> grouped rows ---------------------------------------------------


def _check_rows(weight: torch.Tensor, parts: int, head_dim: int, key: str) -> int:
    rows = weight.shape[0]
    if rows % (parts * head_dim) != 0:
        raise WeightsLayoutError(
            f"{key}: {rows} rows are not a multiple of {parts} x head_dim {head_dim}; "
            f"the weights do not match the configured head_dim."
        )
    return rows // (parts * head_dim)


def per_head_to_grouped(weight: torch.Tensor, parts: int, head_dim: int, key: str = "weight") -> torch.Tensor:
    """Official [q_h k_h v_h]_h row order -> ours [Q_all; K_all; V_all] (parts = 3 or 2)."""
    heads = _check_rows(weight, parts, head_dim, key)
    rest = weight.shape[1:]
    return weight.reshape(heads, parts, head_dim, *rest).transpose(0, 1).reshape(weight.shape).contiguous()


def grouped_to_per_head(weight: torch.Tensor, parts: int, head_dim: int, key: str = "weight") -> torch.Tensor:
    """Ours [Q_all; K_all; V_all] -> official per-head row order (inverse of the above)."""
    heads = _check_rows(weight, parts, head_dim, key)
    rest = weight.shape[1:]
    return weight.reshape(parts, heads, head_dim, *rest).transpose(0, 1).reshape(weight.shape).contiguous()


def official_tensor_to_ours(official_key: str, tensor: torch.Tensor, head_dim: int) -> Tuple[str, torch.Tensor]:
    key = official_key_to_ours(official_key)
    parts = fused_parts(key)
    if parts > 1:
        tensor = per_head_to_grouped(tensor, parts, head_dim, official_key)
    return key, tensor


def our_tensor_to_official(key: str, tensor: torch.Tensor, head_dim: int) -> Tuple[str, torch.Tensor]:
    parts = fused_parts(key)
    if parts > 1:
        tensor = grouped_to_per_head(tensor, parts, head_dim, key)
    return our_key_to_official(key), tensor


def official_to_ours(state_dict: Mapping[str, torch.Tensor], head_dim: int) -> Dict[str, torch.Tensor]:
    return dict(official_tensor_to_ours(k, v, head_dim) for k, v in state_dict.items())


def ours_to_official(state_dict: Mapping[str, torch.Tensor], head_dim: int) -> Dict[str, torch.Tensor]:
    return dict(our_tensor_to_official(k, v, head_dim) for k, v in state_dict.items())


def infer_head_dim(keys_and_shapes: Mapping[str, Tuple[int, ...]]) -> Optional[int]:
    """head_dim from any q_norm weight (official and our names agree there)."""
    for key, shape in keys_and_shapes.items():
        if key.endswith("attn1.q_norm.weight"):
            return int(shape[0])
    return None


# --- tensor-parallel shard / merge ----------------------------------------------------------


def _divisible(size: int, tp_size: int, key: str, what: str) -> None:
    if size % tp_size != 0:
        raise WeightsLayoutError(
            f"{key}: {what} {size} cannot be split over {TP_FLAG} {tp_size}; choose a TP size that "
            f"divides it."
        )


def shard_tensor(key: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank `tp_rank`'s part of a full tensor in our layout (a view or the tensor itself)."""
    plan, leaf = plan_for_parameter(key)
    if tp_size == 1 or plan is None:
        return tensor
    dim = split_dim(plan, leaf)
    if dim is None:
        return tensor
    parts = plan.fused if dim == 0 else 1
    _divisible(tensor.shape[dim], parts * tp_size, key, f"dimension {dim} of size")
    if parts == 1:
        return tensor.chunk(tp_size, dim=dim)[tp_rank]
    return torch.cat([part.chunk(tp_size, dim=0)[tp_rank] for part in tensor.chunk(parts, dim=0)], dim=0)


def merge_tensor(key: str, shards: List[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every TP rank's part, in rank order (inverse of shard_tensor)."""
    tp_size = len(shards)
    plan, leaf = plan_for_parameter(key)
    if tp_size == 1 or plan is None or split_dim(plan, leaf) is None:
        return shards[0]
    dim = split_dim(plan, leaf)
    parts = plan.fused if dim == 0 else 1
    if parts == 1:
        return torch.cat(shards, dim=dim)
    per_rank = [s.chunk(parts, dim=0) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=0) for i in range(parts)], dim=0)


def official_rank_index(key: str, shape: Sequence[int], tp_rank: int, tp_size: int) -> Tuple[slice, ...]:
    """The index of TP rank `tp_rank`'s part in the OFFICIAL tensor of our `key` (full `shape`): one contiguous
    range on the split dimension, so a rank reads only its own bytes.

    For the fused projections this holds because the official rows are per head ([q_h k_h v_h] for each head h):
    the rows of heads [r*H/tp, (r+1)*H/tp) are contiguous, and `official_part_views` regroups them into the rank's
    [Q_r; K_r; V_r], which is what `shard_tensor(official_tensor_to_ours(...))` gives. It needs whole heads per
    rank (H % tp == 0), which the model's construction and the strict shape check guarantee before any copy."""
    index = [slice(None)] * len(shape)
    plan, leaf = plan_for_parameter(key)
    dim = split_dim(plan, leaf) if plan is not None and tp_size > 1 else None
    if dim is not None:
        size = shape[dim] // tp_size
        index[dim] = slice(tp_rank * size, (tp_rank + 1) * size)
    return tuple(index)


def official_part_views(dst: torch.Tensor, key: str, part: torch.Tensor,
                        head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(`dst` view, `part` view) of equal shape such that `dst_view.copy_(part_view)` puts a rank's part of an
    official tensor (`official_rank_index`) into `dst` in our layout and dtype, without an intermediate copy, and
    can be done in slices along the first dimension (rows; heads for the fused projections, whose rows
    [head][part][d] are written to [part][head][d])."""
    parts = fused_parts(key)
    if parts == 1:
        return dst, part
    rest = tuple(part.shape[1:])
    return dst.view(parts, -1, head_dim, *rest).transpose(0, 1), part.reshape(-1, parts, head_dim, *rest)


def full_shape(key: str, local_shape: Iterable[int], tp_size: int) -> Tuple[int, ...]:
    """The unsharded shape of a parameter whose TP-local shape is `local_shape`."""
    shape = list(local_shape)
    plan, leaf = plan_for_parameter(key)
    if plan is not None and tp_size > 1:
        dim = split_dim(plan, leaf)
        if dim is not None:
            shape[dim] *= tp_size
    return tuple(shape)


def shard_state_dict(state_dict: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    return {k: shard_tensor(k, v, tp_rank, tp_size).clone() for k, v in state_dict.items()}


def split_state_dict(state_dict: Mapping[str, torch.Tensor], tp_size: int) -> List[Dict[str, torch.Tensor]]:
    return [shard_state_dict(state_dict, r, tp_size) for r in range(tp_size)]


def merge_state_dicts(shards: List[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = list(shards[0])
    for rank, sd in enumerate(shards[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise WeightsLayoutError(f"TP rank {rank} holds different keys than rank 0: {diff[:10]}")
    return {k: merge_tensor(k, [sd[k] for sd in shards]) for k in keys}


# --- the official architecture (names and shapes) -------------------------------------------


def official_param_shapes(config: Mapping) -> Dict[str, Tuple[int, ...]]:
    """Every official parameter name and shape for an official constructor config."""
    heads, hd = config["num_attention_heads"], config["attention_head_dim"]
    d = heads * hd
    c_in = config["in_channels"]
    c_out = config.get("out_channels") or c_in
    p = config.get("patch_size", 1)
    llm, clip = config["caption_channels"]
    i2v = bool(config.get("use_additional_conditions", False))
    affine = bool(config.get("norm_elementwise_affine", False))
    shapes: Dict[str, Tuple[int, ...]] = {
        "pos_embed.proj.weight": (d, c_in * (2 if i2v else 1), p, p),
        "pos_embed.proj.bias": (d,),
        "adaln_single.linear.weight": (6 * d, d),
        "adaln_single.linear.bias": (6 * d,),
        "caption_projection.linear_1.weight": (d, llm),
        "caption_projection.linear_1.bias": (d,),
        "caption_projection.linear_2.weight": (d, d),
        "caption_projection.linear_2.bias": (d,),
        "clip_projection.weight": (d, clip),
        "clip_projection.bias": (d,),
        "scale_shift_table": (2, d),
        "proj_out.weight": (p * p * c_out, d),
        "proj_out.bias": (p * p * c_out,),
    }
    embedders = ["timestep_embedder"] + (["motion_score_embedder"] if i2v else [])
    for name in embedders:
        prefix = f"adaln_single.emb.{name}."
        shapes.update({prefix + "linear_1.weight": (d, 256), prefix + "linear_1.bias": (d,),
                       prefix + "linear_2.weight": (d, d), prefix + "linear_2.bias": (d,)})
    if affine:
        for name in ("caption_norm", "norm_out"):
            width = llm if name == "caption_norm" else d
            shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})
    for i in range(config["num_layers"]):
        b = f"transformer_blocks.{i}."
        shapes.update({
            b + "scale_shift_table": (6, d),
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn1.wqkv.weight": (3 * d, d),
            b + "attn1.wo.weight": (d, d),
            b + "attn1.q_norm.weight": (hd,), b + "attn1.k_norm.weight": (hd,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "attn2.wq.weight": (d, d),
            b + "attn2.wkv.weight": (2 * d, d),
            b + "attn2.wo.weight": (d, d),
            b + "attn2.q_norm.weight": (hd,), b + "attn2.k_norm.weight": (hd,),
            b + "ff.net.0.proj.weight": (4 * d, d),
            b + "ff.net.2.weight": (d, 4 * d),
        })
    return shapes


# --- config.json (official constructor keys) <-> PredictorConfig ---------------------------

_DIRECT = ("in_channels", "num_layers", "dropout", "patch_size", "norm_type", "norm_elementwise_affine",
           "norm_eps", "use_additional_conditions")


def default_channel_split(head_dim: int) -> List[int]:
    """The official RoPE split is [64, 32, 32] for head_dim 128: half for frames, a quarter
    each for rows and columns. Other head dims keep those proportions."""
    if head_dim % 8 != 0:
        raise WeightsLayoutError(
            f"head_dim {head_dim}: the official RoPE split (1/2, 1/4, 1/4 of head_dim, each even) needs "
            f"head_dim divisible by 8; set channel_split explicitly."
        )
    return [head_dim // 2, head_dim // 4, head_dim // 4]


def predictor_kwargs_from_official_config(config: Mapping, source: str) -> Dict:
    """PredictorConfig keys from an official transformer/config.json; unknown keys are errors."""
    known = set(_DIRECT) | {"num_attention_heads", "attention_head_dim", "out_channels", "caption_channels"}
    known |= set(OFFICIAL_CONFIG_IGNORED)
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise WeightsLayoutError(
            f"{source}: unknown key(s) {unknown} in the official DiT config; expected the StepVideoModel "
            f"constructor keys {sorted(known)}."
        )
    missing = [k for k in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers")
               if k not in config]
    if missing:
        raise WeightsLayoutError(f"{source}: missing required key(s) {missing} in the official DiT config.")
    caption = config.get("caption_channels", [6144, 1024])
    if not isinstance(caption, (list, tuple)) or len(caption) != 2:
        raise WeightsLayoutError(
            f"{source}: caption_channels {caption!r} must be [step_llm width, clip width]; a single width "
            f"(no CLIP projection) is not a StepVideo checkpoint this DiT can run."
        )
    kwargs = {k: config[k] for k in _DIRECT if k in config}
    kwargs["num_heads"] = config["num_attention_heads"]
    kwargs["head_dim"] = config["attention_head_dim"]
    out = config.get("out_channels")
    kwargs["out_channels"] = config["in_channels"] if out is None else out
    kwargs["caption_channels"] = list(caption)
    p = kwargs.get("patch_size", 1)
    kwargs["patch_size_thw"] = [1, p, p]
    return kwargs


def official_config_from_predictor(cfg) -> Dict:
    """The official constructor config (config.json) for a PredictorConfig."""
    return {
        "_class_name": "StepVideoModel",
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers,
        "dropout": cfg.dropout,
        "patch_size": cfg.patch_size,
        "norm_type": cfg.norm_type,
        "norm_elementwise_affine": cfg.norm_elementwise_affine,
        "norm_eps": cfg.norm_eps,
        "use_additional_conditions": cfg.use_additional_conditions,
        "caption_channels": list(cfg.caption_channels),
        "attention_type": "torch",
    }


class PretrainedLoadError(CheckpointMismatchError):
    """Weights that do not match the model; the message names the path and the keys."""


def infer_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> Dict:
    """PredictorConfig keys read off the tensor shapes of a (TP-sharded) state dict, our names."""
    need = ["pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight",
            "clip_projection.weight", "transformer_blocks.0.attn1.q_norm.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise PretrainedLoadError(
            f"{source}: cannot read the DiT configuration off the checkpoint, key(s) {missing} are absent. "
            f"Pass config=PredictorConfig(...) (the model JSON's predictor section) to from_pretrained."
        )
    head_dim = sd["transformer_blocks.0.attn1.q_norm.weight"].shape[0]
    dim, c_in, p, _ = sd["pos_embed.proj.weight"].shape
    i2v = any(k.startswith("adaln_single.emb.motion_score_embedder.") for k in sd)
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    return {
        "num_layers": layers, "num_heads": dim // head_dim, "head_dim": head_dim,
        "in_channels": c_in // (2 if i2v else 1), "out_channels": sd["proj_out.weight"].shape[0] // (p * p),
        "patch_size": p, "patch_size_thw": [1, p, p], "use_additional_conditions": i2v,
        "caption_channels": [sd["caption_projection.linear_1.weight"].shape[1], sd["clip_projection.weight"].shape[1]],
        "norm_elementwise_affine": "norm_out.weight" in sd,
    }
