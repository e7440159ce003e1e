"""Device detection, backend choice, the CPU adaptor and one-process start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mindspeed_mm.runtime import cpu_adaptor
from mindspeed_mm.runtime.device import detect_device_type, resolve_backend
from mindspeed_mm.runtime.initialize import ParallelConfigError, validate_parallel_layout

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = not torch.cuda.is_available()


def test_detects_cpu_and_honours_override(monkeypatch):
    monkeypatch.delenv("MINDSPEED_MM_DEVICE", raising=False)
    if CPU_ONLY:
        assert detect_device_type() == "cpu"
    monkeypatch.setenv("MINDSPEED_MM_DEVICE", "cpu")
    assert detect_device_type() == "cpu"
    monkeypatch.setenv("MINDSPEED_MM_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"MINDSPEED_MM_DEVICE='tpu' is not a device type; use one of npu, cuda, cpu"):
        detect_device_type()
    if CPU_ONLY:
        monkeypatch.setenv("MINDSPEED_MM_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="torch.cuda.is_available\\(\\) is False"):
            detect_device_type()
        monkeypatch.setenv("MINDSPEED_MM_DEVICE", "npu")
        with pytest.raises(RuntimeError, match="torch_npu is not importable"):
            detect_device_type()


def test_backend_follows_the_device():
    # The seed always passes --distributed-backend nccl; it means "the accelerator's library".
    assert resolve_backend("nccl", "cpu") == "gloo"
    assert resolve_backend("nccl", "npu") == "hccl"
    assert resolve_backend("hccl", "cuda") == "nccl"
    assert resolve_backend(None, "cuda") == "nccl"
    assert resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ValueError, match="--distributed-backend 'mpi' is not supported"):
        resolve_backend("mpi", "cpu")


def test_parallel_layout_validation():
    layout = validate_parallel_layout(8, tp=2, cp=2, pp=1)
    assert (layout.tensor, layout.context, layout.data) == (2, 2, 2)
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible .* = 4; launch a multiple of 4"):
        validate_parallel_layout(6, tp=2, cp=2, pp=1)
    with pytest.raises(ParallelConfigError, match=r"--pipeline-model-parallel-size 2 is not supported yet"):
        validate_parallel_layout(4, tp=1, cp=1, pp=2)
    with pytest.raises(ParallelConfigError, match=r"--context-parallel-size 0 must be at least 1"):
        validate_parallel_layout(4, tp=1, cp=0, pp=1)


@pytest.mark.skipif(not CPU_ONLY, reason="the CPU adaptor is only for machines without CUDA")
def test_cpu_adaptor_redirects_cuda_requests_and_restores():
    from megatron.core.tensor_parallel import random as mcore_random

    # In-process training and inference tests earlier in the session install the adaptor for the whole process
    # (as a CPU job does); this test needs a process without it, and leaves the process as it found it.
    was_installed = cpu_adaptor.is_installed()
    cpu_adaptor.uninstall()
    try:
        _check_adaptor_install_and_uninstall(mcore_random)
    finally:
        if was_installed:
            cpu_adaptor.install()


def _check_adaptor_install_and_uninstall(mcore_random):
    original_get = mcore_random._get_cuda_rng_state
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()
    with cpu_adaptor.installed():
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device="cuda:0").device.type == "cpu"
        x = torch.ones(2)
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert x.type(torch.float64).dtype == torch.float64  # conversions still convert
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize()
        assert torch.cuda.is_available() is False
        # RNG: torch.cuda.* and Megatron's helpers act on the CPU default generator.
        torch.cuda.manual_seed(5)
        a = torch.rand(4)
        torch.manual_seed(5)
        assert torch.equal(a, torch.rand(4))
        state = mcore_random._get_cuda_rng_state()
        b = torch.rand(4)
        mcore_random._set_cuda_rng_state(state)
        assert torch.equal(b, torch.rand(4))
    assert mcore_random._get_cuda_rng_state is original_get
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()


@pytest.mark.skipif(not CPU_ONLY, reason="the CPU adaptor is only for machines without CUDA")
def test_rng_tracker_fork_uses_its_own_stream():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    with cpu_adaptor.installed():
        model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
        default_before = torch.default_generator.get_state()
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(5)
        # The fork restored the default stream untouched...
        assert torch.equal(torch.default_generator.get_state(), default_before)
        # ...and drew from the model-parallel seed: seed + 2718 + tp_rank.
        torch.manual_seed(123 + 2718 + 1)
        assert torch.equal(inside, torch.rand(5))


def _run_python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", **env_extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_single_process_start_without_torchrun_and_seed_env_vars():
    code = """
        import torch, torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import ColumnParallelLinear
        from megatron.core.transformer import TransformerConfig
        from mindspeed_mm.runtime import initialize_runtime, destroy_runtime
        layout = initialize_runtime(seed=7, backend="nccl")
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo", dist.get_backend()
        assert ps.get_tensor_model_parallel_world_size() == 1 and layout.data == 1
        cfg = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, use_cpu_initialization=True)
        layer = ColumnParallelLinear(4, 6, config=cfg, init_method=torch.nn.init.ones_, gather_output=True)
        out, _ = layer(torch.ones(2, 4))
        assert out.shape == (2, 6) and torch.all(out == 4), out
        destroy_runtime()
        print("OK")
    """
    seed_env = {"NPUS_PER_NODE": "8", "GPUS_PER_NODE": "8", "ASCEND_GLOBAL_LOG_LEVEL": "3",
                "ASCEND_SLOG_PRINT_TO_STDOUT": "0", "TASK_QUEUE_ENABLE": "1", "COMBINED_ENABLE": "1",
                "CPU_AFFINITY_CONF": "1", "HCCL_CONNECT_TIMEOUT": "1200", "MULTI_STREAM_MEMORY_REUSE": "1",
                "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    proc = _run_python(code, seed_env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
