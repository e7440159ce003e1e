"""Bring up torch.distributed and Megatron-core's parallel state on any device.

`initialize_runtime(...)` is the one call every entry point makes (pretrain, inference,
DPO, feature extraction). Under torchrun it reads RANK/WORLD_SIZE/MASTER_* from the
environment; without torchrun it starts a one-process group, so the same code runs from a
plain `python` command, a notebook or a test.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_adaptor
from .device import get_device_type, resolve_backend, set_local_device
from ..errors import MindSpeedMMError
from ..parallel.options import SequenceParallelOptions, set_sequence_parallel_options

logger = logging.getLogger(__name__)

# Ascend-specific variables the seed's launchers export. They are read by CANN/torch_npu
# themselves; on other devices they mean nothing, and we must not fail on them.
ASCEND_ENV_VARS = (
    "ASCEND_SLOG_PRINT_TO_STDOUT",
    "ASCEND_GLOBAL_LOG_LEVEL",
    "ASCEND_LAUNCH_BLOCKING",
    "ASCEND_RT_VISIBLE_DEVICES",
    "TASK_QUEUE_ENABLE",
    "COMBINED_ENABLE",
    "CPU_AFFINITY_CONF",
    "HCCL_CONNECT_TIMEOUT",
    "MULTI_STREAM_MEMORY_REUSE",
    "PYTORCH_NPU_ALLOC_CONF",
)


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the process groups; `data` is derived from the world size."""

    world_size: int
    tensor: int = 1
    context: int = 1
    pipeline: int = 1

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.context * self.pipeline)


class ParallelConfigError(MindSpeedMMError, ValueError):
    """A parallel layout that cannot work; the message names the flags and the fix."""

    same_on_all_ranks = True  # checks of flags and config files, identical on every rank


def validate_parallel_layout(world_size: int, tp: int, cp: int, pp: int) -> ParallelLayout:
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--context-parallel-size", cp),
        ("--pipeline-model-parallel-size", pp),
    ):
        if value < 1:
            raise ParallelConfigError(f"{flag} {value} must be at least 1.")
    if pp != 1:
        raise ParallelConfigError(
            f"--pipeline-model-parallel-size {pp} is not supported yet: only 1 works. Use tensor "
            f"parallel (--tensor-model-parallel-size) and context parallel (--context-parallel-size) "
            f"to spread the model instead."
        )
    model_parallel = tp * cp * pp
    if world_size % model_parallel != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--context-parallel-size {cp} x --pipeline-model-parallel-size {pp} = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes (nproc_per_node x nnodes) or change "
            f"TP/CP in the launcher."
        )
    return ParallelLayout(world_size=world_size, tensor=tp, context=cp, pipeline=pp)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_launcher_env() -> None:
    """Cross-check NPUS_PER_NODE/GPUS_PER_NODE against torchrun; never fatal."""
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    for name in ("NPUS_PER_NODE", "GPUS_PER_NODE"):
        value = os.environ.get(name)
        if value and local_world and value != local_world:
            logger.warning(
                "%s=%s but torchrun started %s processes on this node; torchrun's count is used.",
                name, value, local_world,
            )
    if get_device_type() != "npu":
        present = [v for v in ASCEND_ENV_VARS if v in os.environ]
        if present:
            logger.debug("ignoring Ascend-only environment variables on %s: %s", get_device_type(), present)


def initialize_distributed(backend: Optional[str] = None, timeout_minutes: int = 10) -> None:
    """Initialise torch.distributed from torchrun's environment, or as one process."""
    device_type = get_device_type()
    if device_type == "cpu":
        cpu_adaptor.install()
    elif device_type == "npu":
        # Redirects Megatron's torch.cuda calls to the NPU, as MindSpeed does.
        import torch_npu  # noqa: F401
        from torch_npu.contrib import transfer_to_npu  # noqa: F401
    _check_launcher_env()
    set_local_device()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(
        backend=resolve_backend(backend, device_type),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    timeout_minutes: int = 10,
    options: Optional[SequenceParallelOptions] = None,
) -> ParallelLayout:
    """(Re)initialise Megatron-core's parallel_state with TP, CP and DP (PP must be 1).

    `options` says how the sequence is split (`parallel/options.py`). For `hybrid_cp_algo` Megatron-core's
    hierarchical CP groups are created with sizes [ulysses, ring]: level 0 groups consecutive CP ranks
    (Ulysses), level 1 strides over them (ring)."""
    from megatron.core import parallel_state

    options = options or SequenceParallelOptions()
    layout = validate_parallel_layout(
        dist.get_world_size(), tensor_model_parallel_size, context_parallel_size, pipeline_model_parallel_size
    )
    hierarchical = None
    if options.context_parallel_algo == "hybrid_cp_algo":
        u = options.ulysses_size(layout.context)
        if u < 1 or layout.context % u:
            raise ParallelConfigError(f"--ulysses-degree-in-cp {u} must divide --context-parallel-size "
                                      f"{layout.context}.")
        hierarchical = [u, layout.context // u]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
        hierarchical_context_parallel_sizes=hierarchical,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_sequence_parallel_options(options)
    return layout


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker.

    As in Megatron: the default generator gets `seed` on every rank (so DP and CP ranks drop
    the same elements in replicated regions), and the tracker's model-parallel state gets
    `seed + 2718 + tp_rank` (so TP ranks drop different elements of their shards).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if seed is None or seed < 0:
        raise ValueError(f"--seed {seed} must be a non-negative integer.")
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize_runtime(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: int = 10,
    sequence: Optional[SequenceParallelOptions] = None,
) -> ParallelLayout:
    """torch.distributed + parallel_state + seeds, in that order. `sequence`: how CP and SP split the tokens
    (`arguments.sequence_options(args)`); Ulysses CP without sequence parallel when omitted."""
    initialize_distributed(backend=backend, timeout_minutes=timeout_minutes)
    options = sequence or SequenceParallelOptions()
    layout = initialize_model_parallel(
        tensor_model_parallel_size, context_parallel_size, pipeline_model_parallel_size, timeout_minutes, options
    )
    set_random_seed(seed)
    return layout


def destroy_runtime() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    set_sequence_parallel_options(SequenceParallelOptions())
    if dist.is_initialized():
        dist.destroy_process_group()
