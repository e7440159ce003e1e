"""How each StepVideo DiT tensor is split over tensor-parallel ranks: the plan's data.

One table serves the layers that split the DiT (`models/predictor/stepvideo/parallelize.py` builds Megatron's
column and row layers from it) and the formats that store it (the Megatron layout holds one TP shard per rank;
`stepvideo_adapter.py` shards and merges, `stepvideo_sharded.py` describes the shards to Megatron-core's
distributed checkpoints). Keys are module names relative to a transformer block, or to the model for
`adaln_single.linear`; see parallelize.py for the plan as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

TP_FLAG = "--tensor-model-parallel-size"


@dataclass(frozen=True)
class LinearPlan:
    """How one linear layer is split over the tensor-parallel group."""

    style: str  # "column" (output features split) or "row" (input features split)
    fused: int = 1  # column only: the weight stacks this many equal parts, each split on its own
    gather_output: bool = False  # column only: all ranks get the full output
    # Under --sequence-parallel the layer's token axis is split over TP outside it: a column layer all-gathers its
    # input (reduce-scatters the input gradient), a row layer reduce-scatters its output. False for the layers
    # whose input is not the token stream (the text, the timestep embedding).
    sequence_parallel: bool = True


TP_PLAN: Dict[str, LinearPlan] = {
    "attn1.proj_qkv": LinearPlan("column", fused=3),
    "attn1.proj_out": LinearPlan("row"),
    "attn2.proj_q": LinearPlan("column"),
    "attn2.proj_kv": LinearPlan("column", fused=2, sequence_parallel=False),
    "attn2.proj_out": LinearPlan("row"),
    "ff.net.0.proj": LinearPlan("column"),
    "ff.net.2": LinearPlan("row"),
    "adaln_single.linear": LinearPlan("column", gather_output=True, sequence_parallel=False),
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
    """The tensor dimension that TP splits for this parameter, or None when replicated.

    A LoRA adapter on the layer (`models/lora.py`) follows it: on a column layer `lora_B` (out, r) is split like the
    weight's rows and `lora_A` replicated; on a row layer `lora_A` (r, in) is split like the weight's columns and
    `lora_B` replicated."""
    if plan.style == "column":
        return None if leaf == "lora_A" else 0
    return 1 if leaf in ("weight", "lora_A") else None  # a row-parallel bias is added after the all-reduce
