"""Which accelerator this process runs on, and which collective backend goes with it.

One function decides the device type for the whole process. Everything else asks
`get_device_type()` / `current_device()` instead of hard-coding "cuda", so the
production path is the same code on Ascend NPUs, NVIDIA GPUs and plain CPUs.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch

from ..errors import MindSpeedMMError

logger = logging.getLogger(__name__)


class DeviceConfigError(MindSpeedMMError, ValueError):
    """A device or backend setting (MINDSPEED_MM_DEVICE, --distributed-backend) that names no usable choice."""

    same_on_all_ranks = True  # the launcher gives every rank the same environment and flags


class DeviceUnavailableError(MindSpeedMMError, RuntimeError):
    """The requested accelerator is not there (not installed, not visible to this rank)."""

DEVICE_TYPES = ("npu", "cuda", "cpu")
BACKEND_FOR_DEVICE = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

# Set this to force a device type, e.g. MINDSPEED_MM_DEVICE=cpu on a GPU box for debugging.
DEVICE_ENV = "MINDSPEED_MM_DEVICE"

_device_type: Optional[str] = None


def _npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU."""
    try:
        importlib.import_module("torch_npu")
    except Exception:  # ImportError, or a broken CANN install raising at import time
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available() and npu.device_count() > 0)


def detect_device_type() -> str:
    """Return "npu", "cuda" or "cpu" (an explicit MINDSPEED_MM_DEVICE wins)."""
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced:
        if forced not in DEVICE_TYPES:
            raise DeviceConfigError(
                f"{DEVICE_ENV}={forced!r} is not a device type; use one of {', '.join(DEVICE_TYPES)} "
                f"or unset it to auto-detect."
            )
        if forced == "npu" and not _npu_available():
            raise DeviceUnavailableError(f"{DEVICE_ENV}=npu but torch_npu is not importable or sees no NPU; "
                                         f"install torch_npu and the CANN toolkit, or unset {DEVICE_ENV}.")
        if forced == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False; check the "
                                         f"driver and CUDA_VISIBLE_DEVICES, or unset {DEVICE_ENV}.")
        return forced
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def get_device_type() -> str:
    """The device type of this process, detected once and cached."""
    global _device_type
    if _device_type is None:
        _device_type = detect_device_type()
    return _device_type


def reset_device_type_cache() -> None:
    """Forget the cached device type (tests that change MINDSPEED_MM_DEVICE use this)."""
    global _device_type
    _device_type = None


def resolve_backend(requested: Optional[str], device_type: Optional[str] = None) -> str:
    """Map the seed's `--distributed-backend` onto what the device can actually run.

    The seed's launchers always pass `nccl`, even on Ascend. Like MindSpeed, we read it as
    "the accelerator's collective library": hccl on NPU, nccl on CUDA, gloo on CPU.
    """
    device_type = device_type or get_device_type()
    native = BACKEND_FOR_DEVICE[device_type]
    if requested is None or requested == native:
        return native
    if requested in ("nccl", "hccl"):
        if requested != native:
            logger.info("--distributed-backend %s on a %s machine: using %s", requested, device_type, native)
        return native
    if requested == "gloo":
        return "gloo"
    raise DeviceConfigError(
        f"--distributed-backend {requested!r} is not supported; use nccl (mapped to {native} here), "
        f"hccl or gloo."
    )


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def current_device() -> torch.device:
    """The torch.device this rank computes on."""
    device_type = get_device_type()
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type)
    return torch.device(device_type, module.current_device())


def set_local_device() -> torch.device:
    """Bind this rank to its local accelerator (LOCAL_RANK); a no-op on CPU."""
    device_type = get_device_type()
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type)
    count = module.device_count()
    index = local_rank()
    per_node = os.environ.get("NPUS_PER_NODE" if device_type == "npu" else "GPUS_PER_NODE")
    if index >= count:
        raise DeviceUnavailableError(
            f"LOCAL_RANK={index} but only {count} {device_type} device(s) are visible"
            + (f" (the launcher set {device_type.upper()}S_PER_NODE={per_node})" if per_node else "")
            + "; lower --nproc_per_node or check ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES."
        )
    module.set_device(index)
    return torch.device(device_type, index)


def synchronize() -> None:
    device_type = get_device_type()
    if device_type != "cpu":
        getattr(torch, device_type).synchronize()
