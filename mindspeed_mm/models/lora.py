"""LoRA on the DiT's planned linears, tensor-parallel aware and transparent to context parallel.

    apply_lora(dit, target_modules=("attn1.proj_qkv", "attn1.proj_out"), r=16, alpha=16, dropout=0.0)

Applied after the parallel plan (like the plan itself, from outside the model's math): each target layer keeps
its module and its weight's key, and gains two parameters, `lora_A` (r, in) and `lora_B` (out, r), and a forward
hook that adds `B(A(dropout(x))) * alpha / r` to its output. B starts at zero, so the adapted model starts equal
to the base. `lora_parameters(model)` lists the adapters; everything else is frozen by `apply_lora`.

Under tensor parallel the adapter follows its base layer (the split that keeps the adapter's own communication
smallest, as in Megatron-LM's and peft's parallel LoRA):

- column base (output split): A replicated (r, in); B's rows split like the base weight (fused QKV: per part). The
  r-wide gradient of A's output is all-reduced over TP (with SP: the r-wide activations all-gathered instead).
- row base (input split): A's columns split like the base weight; B replicated (out, r). The r-wide A output is
  all-reduced over TP (with SP: reduce-scattered).

Every adapter gradient is then complete on every TP rank (replicated ones equal, split ones their shard), so
Megatron's grad norm and the optimizer see them as they see the base layers. Context parallel needs nothing: the
adapter acts per token, and its gradients are averaged over CP like every other parameter's.

We wrote this rather than use peft's `LoraParallelLinear`: peft wraps the base layer in a new module (its weight's
key becomes `base_layer.weight`, so the base checkpoints would no longer load by name), it builds its parallel
A/B from Megatron's layers assuming Megatron's (s, b, h) layout everywhere, and it adds a dependency; the hook
keeps the base keys and the DiT's (b, s, h) layout. The exported adapter uses peft's names (a later step).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, List, Sequence

import torch
from torch import nn

from mindspeed_mm.checkpoint.stepvideo_layout import plan_for_module

LORA_SUFFIXES = (".lora_A", ".lora_B")
DEFAULT_TARGETS = ("attn1.proj_qkv", "attn1.proj_out", "attn2.proj_q", "attn2.proj_kv", "attn2.proj_out")
ALL_TARGETS = DEFAULT_TARGETS + ("ff.net.0.proj", "ff.net.2")


class LoRAConfigError(ValueError):
    pass


def _lora_forward(module: nn.Module, args, output):
    if not module.lora_enabled:
        return None  # the base layer's output, unchanged
    x = args[0]
    state = module.lora_state
    h = module.lora_dropout(x)
    a = torch.nn.functional.linear(h, module.lora_A.to(h.dtype))
    style = module.lora_style
    if state is not None and state.tp > 1:
        from megatron.core.tensor_parallel import mappings

        sp = getattr(module, "sequence_parallel", False)  # Megatron's SP layers take (s, b, h): tokens on dim 0
        if style == "column":
            # A is replicated; B holds this rank's output rows. The gradient of A's output sums over TP ranks.
            a = (mappings.gather_from_sequence_parallel_region(a, group=state.tp_group) if sp
                 else mappings.copy_to_tensor_model_parallel_region(a, group=state.tp_group))
        else:
            # A holds this rank's input columns: its output is a partial sum over TP ranks.
            a = (mappings.reduce_scatter_to_sequence_parallel_region(a, group=state.tp_group) if sp
                 else mappings.reduce_from_tensor_model_parallel_region(a, group=state.tp_group))
    delta = torch.nn.functional.linear(a, module.lora_B.to(a.dtype)) * module.lora_scale
    if isinstance(output, tuple):
        return (output[0] + delta.to(output[0].dtype),) + tuple(output[1:])
    return output + delta.to(output.dtype)


def _replicated_grad_reduce(module: nn.Module, name: str, state) -> None:
    """Under sequence parallel a replicated adapter matrix sees only this rank's tokens: all-reduce its gradient
    over TP (what `tp_shared` does for the DiT's replicated weights)."""
    param = getattr(module, name)

    def hook(grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=state.tp_group)
        return grad

    param.register_hook(hook)


def apply_lora(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS, r: int = 16, alpha: float = 16.0,
               dropout: float = 0.0, freeze_base: bool = True, initialize: bool = True) -> List[str]:
    """Add LoRA to every planned linear whose name ends with one of `target_modules` (see `ALL_TARGETS`); returns
    the adapted modules' names. Apply it after `parallelize_stepvideo` (the adapter follows the layer it finds).
    `initialize=False` leaves A uninitialised (its values are about to be loaded)."""
    unknown = [t for t in target_modules if t not in ALL_TARGETS]
    if unknown:
        raise LoRAConfigError(f"--lora-target-modules {unknown} are not LoRA targets of the StepVideo DiT; choose "
                              f"from {list(ALL_TARGETS)}.")
    if r < 1:
        raise LoRAConfigError(f"--lora-r {r} must be at least 1.")
    state = getattr(model, "parallel", None)
    tp, tp_rank = (state.tp, state.tp_rank) if state is not None and state.initialized else (1, 0)
    adapted = []
    if freeze_base:
        model.requires_grad_(False)
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        plan = plan_for_module(name)
        weight = module.weight
        out_local, in_local = weight.shape
        out_full = out_local * tp if plan.style == "column" else out_local
        in_full = in_local * tp if plan.style == "row" else in_local
        factory = dict(device=weight.device, dtype=torch.float32 if weight.dtype == torch.float32 else weight.dtype)
        # A: Kaiming-uniform over the full input (as nn.Linear's), drawn whole on every rank, then sliced, so the
        # adapter is the same at any TP; B: zeros.
        a_full = torch.empty(r, in_full, **factory)
        if initialize and not weight.is_meta:
            nn.init.kaiming_uniform_(a_full, a=math.sqrt(5))
        if plan.style == "row" and tp > 1:
            a_local = a_full.chunk(tp, dim=1)[tp_rank].contiguous()
        else:
            a_local = a_full
        b_rows = out_full // tp if plan.style == "column" else out_full
        module.lora_A = nn.Parameter(a_local)
        module.lora_B = nn.Parameter(torch.zeros(b_rows, r, **factory))
        module.lora_scale = alpha / r
        module.lora_style = plan.style
        module.lora_fused = plan.fused
        module.lora_state = state if tp > 1 else None
        module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        module.lora_enabled = True
        if tp > 1:
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

            split = module.lora_B if plan.style == "column" else module.lora_A
            set_tensor_model_parallel_attributes(split, is_parallel=True, dim=0 if plan.style == "column" else 1,
                                                 stride=1)
            if getattr(module, "sequence_parallel", False):  # attn2.proj_kv (the text) is not sequence parallel
                _replicated_grad_reduce(module, "lora_A" if plan.style == "column" else "lora_B", state)
        module.register_forward_hook(_lora_forward)
        adapted.append(name)
    if not adapted:
        raise LoRAConfigError(f"--lora-target-modules {list(target_modules)} matched no layer of the model.")
    return adapted


def load_adapter(model: nn.Module, path, scale: float = 1.0, log=print) -> List[str]:
    """Apply the adapter of a LoRA run's --save folder (saved at any TP) to `model`, unmerged, its alpha / r times
    `scale`; returns the adapted layers. r, alpha and the layers come from the folder's lora.json."""
    from ..checkpoint.stepvideo_adapter import shard_tensor
    from ..checkpoint.stepvideo_lora import read_adapter

    lora = read_adapter(path, log=log)
    if not lora.target_modules:
        raise LoRAConfigError(f"{path} has no lora.json naming its layers: it was not written by a LoRA run.")
    adapted = apply_lora(model, lora.target_modules, r=lora.r, alpha=lora.alpha, initialize=False)
    own = {n: p for n, p in model.named_parameters() if n.endswith(LORA_SUFFIXES)}
    if set(own) != set(lora.tensors):
        missing, unexpected = sorted(set(own) - set(lora.tensors))[:3], sorted(set(lora.tensors) - set(own))[:3]
        raise LoRAConfigError(f"{path} does not fit this DiT: missing {missing}, unexpected {unexpected} (is it the "
                              f"adapter of a model with these layers?).")
    state = getattr(model, "parallel", None)
    tp_rank, tp = (state.tp_rank, state.tp) if state is not None and state.initialized else (0, 1)
    with torch.no_grad():
        for key, param in own.items():
            part = shard_tensor(key, lora.tensors[key], tp_rank, tp)
            if tuple(part.shape) != tuple(param.shape):
                raise LoRAConfigError(f"{path}: {key} is {tuple(part.shape)} at TP {tp}, this DiT's "
                                      f"{tuple(param.shape)}: the adapter belongs to another model.")
            param.copy_(part)
    for module in lora_modules(model):
        module.lora_scale = lora.scale * scale
    return adapted


def lora_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for n, p in model.named_parameters() if n.endswith(LORA_SUFFIXES))


def lora_state_dict(model: nn.Module) -> dict:
    return {n: p for n, p in model.state_dict().items() if n.endswith(LORA_SUFFIXES)}


def lora_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A")]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


@contextmanager
def lora_disabled(model: nn.Module):
    """Run `model` as its base: every adapter's hook passes the base output through (LoRA-DPO's reference)."""
    modules = lora_modules(model)
    before = [m.lora_enabled for m in modules]
    for m in modules:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m, on in zip(modules, before):
            m.lora_enabled = on
