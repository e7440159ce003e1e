"""Run Megatron-core's CUDA-only code paths on a CPU, unchanged.

Megatron-core assumes CUDA in a few places that the framework needs: the model-parallel
RNG tracker, tensor-parallel gathers (`gather_output=True`), DDP's grad buffers and the
(distributed) optimizer. They fail on a CPU build with "Torch not compiled with CUDA
enabled", or, worse, silently skip work (`_lazy_call` queues RNG updates for a CUDA
initialisation that never comes).

On Ascend, `torch_npu.contrib.transfer_to_npu` solves the same problem by redirecting
CUDA calls to the NPU. This module is that idea for the CPU, kept as small as we could:

1. `torch.cuda` shims: `current_device()` returns the CPU device (Megatron writes
   `device=torch.cuda.current_device()` about forty times), `synchronize`/`empty_cache` are
   no-ops, and the RNG functions act on the CPU default generator, which is the generator
   CPU kernels (dropout, randn) draw from.
2. Megatron's two private RNG helpers (`_get_cuda_rng_state`, `_set_cuda_rng_state`) are
   replaced by CPU versions, so `get_cuda_rng_tracker().fork()` really swaps the state.
3. A `TorchFunctionMode` that maps the literal `device="cuda"` (and `cuda:N`) to the CPU,
   makes `Tensor.cuda()` return the tensor itself, and makes `Tensor.type()` report
   `torch.cuda.*Tensor` names, which the optimizer and grad clipping assert on.

Nothing here is installed on NPU or GPU machines, and no model or training code branches
on the device: the same Megatron DDP, optimizer and RNG tracker run everywhere.
`torch.cuda.is_available()` stays False, so code that asks still learns the truth.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_installed = False
_mode: Optional["CudaToCpuMode"] = None
_saved_cuda_attrs: dict = {}
_saved_megatron_attrs: dict = {}


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


def _cpu_type_name(name: str) -> str:
    # "torch.FloatTensor" -> "torch.cuda.FloatTensor"; leave other strings alone.
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cpu_type_name(func(*args))
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


# --- torch.cuda shims ---------------------------------------------------------------------


def _current_device() -> torch.device:
    return _CPU


def _noop(*_args, **_kwargs) -> None:
    return None


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.default_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


_CUDA_SHIMS = {
    "current_device": _current_device,
    "synchronize": _noop,
    "empty_cache": _noop,
    "get_rng_state": _get_rng_state,
    "set_rng_state": _set_rng_state,
    "manual_seed": _manual_seed,
    "manual_seed_all": _manual_seed,
}


# --- Megatron's private RNG helpers ------------------------------------------------------


def _megatron_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.default_generator.get_state()
    return state.clone() if clone else state


def _megatron_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.default_generator.set_state(new_state)


def install() -> None:
    """Install the CPU adaptor for this process (idempotent)."""
    global _installed, _mode
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU adaptor must not be installed on a machine with CUDA devices")
    for name, shim in _CUDA_SHIMS.items():
        _saved_cuda_attrs[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, shim)

    from megatron.core.tensor_parallel import random as mcore_random

    for name, shim in (
        ("_get_cuda_rng_state", _megatron_get_rng_state),
        ("_set_cuda_rng_state", _megatron_set_rng_state),
    ):
        _saved_megatron_attrs[name] = getattr(mcore_random, name)
        setattr(mcore_random, name, shim)

    _mode = CudaToCpuMode()
    _mode.__enter__()
    _installed = True
    logger.debug("CPU adaptor installed")


def uninstall() -> None:
    """Undo `install()` (used by tests)."""
    global _installed, _mode
    if not _installed:
        return
    if _mode is not None:
        _mode.__exit__(None, None, None)
        _mode = None
    for name, original in _saved_cuda_attrs.items():
        setattr(torch.cuda, name, original)
    from megatron.core.tensor_parallel import random as mcore_random

    for name, original in _saved_megatron_attrs.items():
        setattr(mcore_random, name, original)
    _saved_cuda_attrs.clear()
    _saved_megatron_attrs.clear()
    _installed = False


def is_installed() -> bool:
    return _installed


@contextlib.contextmanager
def installed():
    """Context manager form, for tests that need the adaptor only briefly."""
    was = _installed
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
