"""The memory planner's per-block activations under TP=2 and Ulysses CP=2 on gloo: what autograd saves in a block
of the real DiT (its parallel linears, all-to-alls and frame split) against `block_activations`."""

from __future__ import annotations

from tests.distributed.harness import dist_case, pytest_cases


def _check(tp: int, cp: int) -> None:
    from mindspeed_mm.runtime import initialize_model_parallel
    from mindspeed_mm.tools.memory_plan import block_activations
    from tests.helpers.saved_tensors import saved_bytes_per_block

    initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    for dtype, a in (("bf16", 2), ("fp32", 4)):
        per_block, shape, workload = saved_bytes_per_block(dtype)
        predicted = block_activations(shape, workload, tp, cp, a).total
        assert abs(predicted - per_block[1]) <= 0.02 * per_block[1], (dtype, predicted, per_block)


@dist_case(world_size=2)
def case_tensor_parallel_block_activations():
    _check(tp=2, cp=1)


@dist_case(world_size=2)
def case_context_parallel_block_activations():
    _check(tp=1, cp=2)


test_distributed = pytest_cases(globals())
