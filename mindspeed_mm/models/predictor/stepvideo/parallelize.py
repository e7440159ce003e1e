"""Where tensor and context parallelism go in the StepVideo DiT: the plan, kept beside the math.

Tensor parallel (TP), as in MindSpeed-MM (reference §2). The table's data (`TP_PLAN`) lives in
`mindspeed_mm/checkpoint/stepvideo_layout.py`, shared with the formats that store the shards. Keys are
module names relative to a transformer block, or to the model for `adaln_single.linear`:

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

Context parallel (CP) and sequence parallel (SP), decided for this project:
- the token split: the latents are patch-embedded on every rank into the frame-major token stream
  (b, s = f*h*w, D), padded at the end to a multiple of the ranks that split it (CP, x TP with
  --sequence-parallel), and each rank keeps its contiguous chunk: CP rank c the c-th of CP chunks,
  TP rank t (with SP) the t-th part of that. Tokens, not frames: 36 latent frames at 204 video frames
  do not divide by CP 8, but 36 x 34 x 62 = 75,888 tokens do; when they do not, the pad tokens are
  masked out as self-attention keys and dropped from the output (their outputs get no gradient).
  `split_forward_gather_backward(grad_scale="down")` over CP, exact over TP;
- RoPE positions are the (frame, row, column) of each local token's global index;
- with SP, each block's LayerNorms, modulation and residual adds run on s/(CP*TP) tokens; the column
  layers that read the token stream (attn1.proj_qkv, attn2.proj_q, ff.net.0.proj) all-gather it over
  TP and the row layers reduce-scatter back (Megatron-core's sequence-parallel linears); attn2.proj_kv
  reads the text and adaln_single.linear the timestep embedding, so they are not sequence parallel.
  The replicated tensors used on a rank's tokens (norm weights, the modulation, the final layer's
  weights) go through `tp_shared`, which all-reduces their gradient over TP;
- self-attention on the CP chunk: Ulysses trades sequence shards for head shards with an all-to-all
  over the Ulysses group; ring attention passes K/V blocks around the ring group and merges with
  log-sum-exp (`parallel/ring.py`); the hybrid does Ulysses inside groups of consecutive CP ranks
  and ring across them, so after the all-to-all each rank holds a contiguous block of the sequence.
  Cross-attention stays local (local queries against the full text, local TP heads);
- the output is gathered with `gather_forward_split_backward(grad_scale="up")` over CP, so the loss
  is computed on the full output on every CP rank and averaging a parameter's gradient over
  the CP group (what Megatron DDP does over data x context parallel) gives the
  single-process gradient.

Constraint: num_heads % (TP * Ulysses degree) == 0 (Ulysses degree: CP for ulysses_cp_algo, 1 for
megatron_cp_algo, --ulysses-degree-in-cp for hybrid_cp_algo).

The plan is applied from outside the model (torchtitan's pattern): `StepVideoDiT` is built plain
(`nn.Linear`s with the same parameter names, all heads, no torch.distributed), and
`parallelize_stepvideo(model, state)` swaps in Megatron-core's Column/RowParallelLinear, the CP
attention cores and the sequence-parallel state afterwards. In a plain process (Megatron's parallel
state not initialised) it leaves the model plain.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from mindspeed_mm.checkpoint.stepvideo_layout import TP_FLAG, LinearPlan, plan_for_module
from mindspeed_mm.parallel import UlyssesAttention, gather_forward_split_backward, split_forward_gather_backward
from mindspeed_mm.runtime.initialize import ParallelConfigError

CP_FLAG = "--context-parallel-size"

# Dimension of the (b, s, D) token stream that context and sequence parallel split.
TOKEN_DIM = 1


# --- the parallel state the model runs in ---------------------------------------------------


@dataclass(frozen=True)
class ParallelState:
    """TP and CP sizes, ranks and groups of this process, and how the tokens are split (all trivial in a plain
    process).

    CP runs as Ulysses over `ulysses_group` (`ulysses` ranks) inside, ring attention over `ring_group` (`ring`
    ranks) across: Ulysses alone is ulysses = cp, ring alone ring = cp, hybrid both."""

    tp: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    cp: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    initialized: bool = False
    sequence_parallel: bool = False
    ulysses: int = 1
    ulysses_group: Any = None
    ring: int = 1
    ring_group: Any = None

    @property
    def token_shards(self) -> int:
        """Ranks the token axis is split over outside the matmuls: CP, times TP with sequence parallel."""
        return self.cp * (self.tp if self.sequence_parallel else 1)


def current_parallel_state() -> ParallelState:
    """Read TP/CP from Megatron's parallel_state (and the CP algorithm and sequence parallel from
    `parallel.options`) when it is initialised, else TP = CP = 1."""
    from megatron.core import parallel_state as ps

    from mindspeed_mm.parallel.options import get_sequence_parallel_options

    if not ps.model_parallel_is_initialized():
        return ParallelState()
    options = get_sequence_parallel_options()
    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    cp_group = ps.get_context_parallel_group()
    ulysses = options.ulysses_size(cp)
    ulysses_group, ring_group = cp_group, None
    if ulysses == 1:
        ulysses_group, ring_group = None, cp_group
    elif ulysses < cp:
        ulysses_group, ring_group = ps.get_hierarchical_context_parallel_groups()
    return ParallelState(
        tp=tp, tp_rank=ps.get_tensor_model_parallel_rank(), tp_group=ps.get_tensor_model_parallel_group(),
        cp=cp, cp_rank=ps.get_context_parallel_rank(), cp_group=cp_group, initialized=True,
        sequence_parallel=options.sequence_parallel and tp > 1,
        ulysses=ulysses, ulysses_group=ulysses_group if ulysses > 1 else None,
        ring=cp // ulysses, ring_group=ring_group if cp // ulysses > 1 else None,
    )


def check_heads_divisible(num_heads: int, tp: int, ulysses: int) -> None:
    if num_heads % (tp * ulysses) != 0:
        raise ParallelConfigError(
            f"num_heads {num_heads} (predictor.num_heads in the model JSON) is not divisible by "
            f"{TP_FLAG} {tp} x the Ulysses degree {ulysses} = {tp * ulysses}: each TP rank holds num_heads/TP "
            f"heads and Ulysses context parallel splits those again. Choose TP and CP whose product divides "
            f"{num_heads}, or use ring attention (--context-parallel-algo megatron_cp_algo, or hybrid_cp_algo "
            f"with --ulysses-degree-in-cp), which does not split heads."
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
            sequence_parallel=state.sequence_parallel,
        )


def _init_normal(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, mean=0.0, std=0.02)


def parallelize_stepvideo(model, state: Optional[ParallelState] = None):
    """Apply the parallel plan to a plain `StepVideoDiT`, in place; returns it.

    `state` defaults to the job's (`current_parallel_state`). Without Megatron's parallel state the model stays
    plain. Otherwise: every planned `nn.Linear` (`TP_PLAN`) becomes Megatron's column or row layer holding this
    TP rank's shard (copied from the plain weights when they exist; left on `meta` when the plain model is on
    `meta`, for a loader to fill), the self-attention core is wrapped for the CP algorithm, the q/k norms get the
    TP group, the FFN its TP dropout, the blocks the state that sequence parallel reads, and `model.config`
    becomes the Megatron `TransformerConfig` of the layout (what Megatron DDP reads).
    """
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    from .layers import FeedForward, RMSNorm, SelfAttention, StepVideoTransformerBlock

    state = current_parallel_state() if state is None else state
    cfg = model.predictor_config
    check_heads_divisible(cfg.num_heads, state.tp, state.ulysses)
    if not state.initialized:
        return model
    # Megatron's layers never initialise here: their shards are copied from the plain weights, or filled by a
    # loader, or drawn by `StepVideoDiT.reset_parameters` once they have memory.
    mcfg = megatron_config(cfg.num_layers, cfg.num_heads, cfg.head_dim, model.config.params_dtype, state, False)
    for name, module in list(model.named_modules()):
        plan = plan_for_module(name)
        if plan is not None and isinstance(module, nn.Linear):
            with torch.device(module.weight.device):
                layer = build_linear(plan, module.in_features, module.out_features, module.bias is not None, mcfg,
                                     state)
            if not module.weight.is_meta:
                with torch.no_grad():
                    for leaf in ("weight", "bias"):
                        if getattr(module, leaf) is not None:
                            getattr(layer, leaf).copy_(adapter.shard_tensor(f"{name}.{leaf}", getattr(module, leaf),
                                                                            state.tp_rank, state.tp))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        elif isinstance(module, RMSNorm) and state.tp > 1:
            module._tp_group = state.tp_group
        elif isinstance(module, FeedForward):
            module._tp_dropout = module.net[1].p > 0 and state.tp > 1
        elif isinstance(module, StepVideoTransformerBlock):
            module._state = state
        elif isinstance(module, SelfAttention):
            module._core = context_parallel_core(module._core, state)
    model.config = mcfg
    model.parallel = state
    return model


def context_parallel_core(core, state: ParallelState):
    """The self-attention core over the CP group: Ulysses, ring, or Ulysses inside ring (module docstring)."""
    if state.ring > 1:
        from mindspeed_mm.parallel.ring import RingAttention

        core = RingAttention(state.ring_group)
    if state.ulysses > 1:
        core = UlyssesAttention(core, state.ulysses_group)
    return core


def build_linear(plan: LinearPlan, in_features: int, out_features: int, bias: bool, config,
                 state: ParallelState) -> nn.Module:
    """Megatron's column or row parallel layer for `plan`, on the current default device."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        set_tensor_model_parallel_attributes,
    )

    if config.sequence_parallel and not plan.sequence_parallel:
        config = copy.copy(config)  # this layer's input is not the token stream (the text, the timestep)
        config.sequence_parallel = False
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
    """Apply a planned layer to (b, s, features); Megatron's parallel linears return (output, bias).

    A sequence-parallel Megatron layer gathers or scatters its token axis with Megatron's sequence-parallel
    mappings, which act on dim 0: the tokens are moved there and back (free when b = 1)."""
    if getattr(layer, "sequence_parallel", False):
        out = layer(x.transpose(0, 1))
        return (out[0] if isinstance(out, tuple) else out).transpose(0, 1)
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def tp_shared(t: Optional[torch.Tensor], state: ParallelState) -> Optional[torch.Tensor]:
    """A replicated tensor used on this rank's share of the tokens under sequence parallel: identity forward,
    gradient all-reduced over TP backward, so replicated parameters get the gradient of all tokens on every TP
    rank (Megatron all-reduces such "sequence_parallel" gradients after backward instead; doing it here keeps
    the module's gradients complete whatever drives it)."""
    if t is None or not state.sequence_parallel:
        return t
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(t, group=state.tp_group)


# --- the token split of context and sequence parallel ---------------------------------------


def padded_tokens(tokens: int, state: ParallelState) -> int:
    """The token count padded up to a multiple of the ranks that split it (CP, x TP with sequence parallel)."""
    shards = state.token_shards
    return -(-tokens // shards) * shards


def shard_tokens(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """(b, s_padded, D) on every rank -> this rank's tokens: chunk cp_rank over CP (gradient gathered, / cp), then
    chunk tp_rank of that over TP with sequence parallel (gradient gathered, exact)."""
    if state.cp > 1:
        x = split_forward_gather_backward(x, state.cp_group, TOKEN_DIM, grad_scale="down")
    if state.sequence_parallel:
        x = split_forward_gather_backward(x, state.tp_group, TOKEN_DIM)
    return x


def unshard_tokens(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The inverse of `shard_tokens`: every rank's tokens in order (gradient split; x cp over CP, which Megatron
    DDP's average over data x context parallel ranks undoes)."""
    if state.sequence_parallel:
        x = gather_forward_split_backward(x, state.tp_group, TOKEN_DIM)
    if state.cp > 1:
        x = gather_forward_split_backward(x, state.cp_group, TOKEN_DIM, grad_scale="up")
    return x
