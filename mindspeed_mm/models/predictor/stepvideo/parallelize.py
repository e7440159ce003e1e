"""Where tensor and context parallelism go in the StepVideo DiT: the plan, kept beside the math.

Tensor parallel (TP), as in MindSpeed-MM (reference §2). Keys are module names relative to a
transformer block, or to the model for `adaln_single.linear`:

| module               | style                         | weight rows/cols held by TP rank r               |
|----------------------|-------------------------------|--------------------------------------------------|
| attn1.proj_qkv       | column, fused [Q; K; V]       | [Q_r; K_r; V_r]: this rank's heads of each part  |
| attn2.proj_q         | column                        | rows of this rank's heads                        |
| attn2.proj_kv        | column, fused [K; V]          | [K_r; V_r]                                       |
| ff.net.0.proj        | column                        | contiguous row chunk r                           |
| attn1/attn2.proj_out | row (input is parallel)       | contiguous column chunk r; output all-reduced    |
| ff.net.2             | row (input is parallel)       | contiguous column chunk r; output all-reduced    |
| adaln_single.linear  | column, output gathered       | contiguous row chunk r (weight and bias)         |

Every other parameter (norms, q/k norms, scale-shift tables, patch embedding, timestep and
text projections, proj_out) is replicated. Heads are split per rank: num_heads / TP each.
The q/k RMSNorm weights are replicated but act on this rank's heads only, so their gradient
is all-reduced over TP inside the model (layers.RMSNorm); every replicated parameter then
holds the same full gradient on every TP rank.

Context parallel (CP, Ulysses), decided for this project:
- every CP rank receives the full latents; the DiT keeps its slice of the latent frame axis
  (dim 1 of (b, f, c, h, w)) with `split_forward_gather_backward(grad_scale="down")`; i2v
  condition latents are split the same way;
- RoPE positions are the global frame indices of the local frames;
- self-attention trades sequence shards for head shards with an all-to-all (Ulysses);
  cross-attention stays local (local queries against the full text, local TP heads);
- the output is gathered with `gather_forward_split_backward(grad_scale="up")`, so the loss
  is computed on the full output on every CP rank and averaging a parameter's gradient over
  the CP group (what Megatron DDP does over data x context parallel) gives the
  single-process gradient.

Constraints: num_heads % (TP * CP) == 0 and latent frames % CP == 0.

In a plain process where Megatron's parallel state is not initialised, TP = CP = 1 and the
planned layers are ordinary `nn.Linear`s with the same parameter names; no torch.distributed
is needed. Once the parallel state exists, Megatron-core's Column/RowParallelLinear are used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mindspeed_mm.parallel import gather_forward_split_backward, split_forward_gather_backward
from mindspeed_mm.runtime.initialize import ParallelConfigError

TP_FLAG = "--tensor-model-parallel-size"
CP_FLAG = "--context-parallel-size"

# Dimension of (b, f, c, h, w) latents that context parallel splits: the latent frame axis.
CP_FRAME_DIM = 1


@dataclass(frozen=True)
class LinearPlan:
    """How one linear layer is split over the tensor-parallel group."""

    style: str  # "column" (output features split) or "row" (input features split)
    fused: int = 1  # column only: the weight stacks this many equal parts, each split on its own
    gather_output: bool = False  # column only: all ranks get the full output


TP_PLAN: Dict[str, LinearPlan] = {
    "attn1.proj_qkv": LinearPlan("column", fused=3),
    "attn1.proj_out": LinearPlan("row"),
    "attn2.proj_q": LinearPlan("column"),
    "attn2.proj_kv": LinearPlan("column", fused=2),
    "attn2.proj_out": LinearPlan("row"),
    "ff.net.0.proj": LinearPlan("column"),
    "ff.net.2": LinearPlan("row"),
    "adaln_single.linear": LinearPlan("column", gather_output=True),
}


def plan_for_module(module_name: str) -> Optional[LinearPlan]:
    """The TP plan of a module given its full dotted name, or None when it is replicated."""
    for name, plan in TP_PLAN.items():
        if module_name == name or module_name.endswith("." + name):
            return plan
    return None


def plan_for_parameter(key: str) -> Tuple[Optional[LinearPlan], str]:
    """(plan, "weight" | "bias") for a state-dict key; plan is None for replicated tensors."""
    module_name, _, leaf = key.rpartition(".")
    return plan_for_module(module_name), leaf


def split_dim(plan: LinearPlan, leaf: str) -> Optional[int]:
    """The tensor dimension that TP splits for this parameter, or None when replicated."""
    if plan.style == "column":
        return 0
    return 1 if leaf == "weight" else None  # a row-parallel bias is added after the all-reduce


# --- the parallel state the model runs in ---------------------------------------------------


@dataclass(frozen=True)
class ParallelState:
    """TP and CP sizes, ranks and groups of this process (all trivial in a plain process)."""

    tp: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    cp: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    initialized: bool = False


def current_parallel_state() -> ParallelState:
    """Read TP/CP from Megatron's parallel_state when it is initialised, else TP = CP = 1."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ParallelState()
    return ParallelState(
        tp=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        cp=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_group=ps.get_context_parallel_group(),
        initialized=True,
    )


def check_heads_divisible(num_heads: int, tp: int, cp: int) -> None:
    if num_heads % (tp * cp) != 0:
        raise ParallelConfigError(
            f"num_heads {num_heads} (predictor.num_heads in the model JSON) is not divisible by "
            f"{TP_FLAG} {tp} x {CP_FLAG} {cp} = {tp * cp}: each TP rank holds num_heads/TP heads "
            f"and Ulysses context parallel splits those again over CP. Choose TP and CP whose "
            f"product divides {num_heads}."
        )


def check_frames_divisible(frames: int, cp: int) -> None:
    if frames % cp != 0:
        raise ParallelConfigError(
            f"the latents have {frames} latent frames, which {CP_FLAG} {cp} does not divide: "
            f"context parallel splits the latent frame axis evenly over the CP ranks. Use a "
            f"{CP_FLAG} that divides {frames}, or a frame count (num_frames in the data JSON) "
            f"whose latent frame count is a multiple of {cp}."
        )


# --- layers ---------------------------------------------------------------------------------


def megatron_config(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                    state: ParallelState, perform_initialization: bool):
    """The Megatron TransformerConfig that the parallel linears (and Megatron DDP) read."""
    from megatron.core.transformer import TransformerConfig

    hidden = num_heads * head_dim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerConfig(
            num_layers=num_layers,
            hidden_size=hidden,
            num_attention_heads=num_heads,
            kv_channels=head_dim,
            ffn_hidden_size=4 * hidden,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=True,
            perform_initialization=perform_initialization,
            tensor_model_parallel_size=state.tp,
            context_parallel_size=state.cp,
        )


def _init_normal(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, mean=0.0, std=0.02)


def build_linear(name: str, in_features: int, out_features: int, bias: bool, config, state: ParallelState,
                 device=None) -> nn.Module:
    """The layer for `name` (a TP_PLAN key): Megatron Column/Row parallel, or nn.Linear when
    Megatron's parallel state is not initialised (a plain process, TP = 1)."""
    plan = TP_PLAN[name]
    if not state.initialized:
        layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=config.params_dtype)
        if config.perform_initialization:
            _init_normal(layer.weight)
            if bias:
                nn.init.zeros_(layer.bias)
        return layer
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        set_tensor_model_parallel_attributes,
    )

    if plan.style == "column":
        layer = ColumnParallelLinear(
            in_features, out_features, config=config, init_method=_init_normal, bias=bias,
            gather_output=plan.gather_output, tp_group=state.tp_group,
        )
    else:
        layer = RowParallelLinear(
            in_features, out_features, config=config, init_method=_init_normal, bias=bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group,
        )
    # Megatron marks the weight as split only inside its init functions, which do not run when the weights are
    # loaded (perform_initialization false). Unmarked, the grad norm counts it on TP rank 0 alone, so clipping
    # under TP would use a wrong norm.
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, is_parallel=True,
                                             dim=0 if plan.style == "column" else 1, stride=1)
    return layer


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a planned layer; Megatron's parallel linears return (output, bias)."""
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


# --- context parallel -----------------------------------------------------------------------


def cp_split_frames(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """This CP rank's contiguous slice of the latent frame axis (gradient gathered, / cp)."""
    if state.cp == 1:
        return x
    return split_forward_gather_backward(x, state.cp_group, CP_FRAME_DIM, grad_scale="down")


def cp_gather_frames(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """All CP ranks' frames in rank order (gradient split, x cp)."""
    if state.cp == 1:
        return x
    return gather_forward_split_backward(x, state.cp_group, CP_FRAME_DIM, grad_scale="up")
