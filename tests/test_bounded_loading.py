"""Bounded loading of the DiT: built on `meta` without initialisation, keys and shapes checked before anything is
allocated or read, each tensor copied into its parameter as it is read, Megatron rank files mapped instead of read
whole, official tensors sliced per TP rank. The memory tests measure the peak RSS of a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm.checkpoint import save_model_state_dict
from mindspeed_mm.checkpoint.file_pages import FilePages
from mindspeed_mm.models.predictor import PretrainedLoadError, StepVideoDiT
from mindspeed_mm.models.predictor.stepvideo import pretrained
from mindspeed_mm.checkpoint import stepvideo_adapter as adapter
from mindspeed_mm.tiny.dit import official_config, random_official_state_dict, write_official_dit

REPO = Path(__file__).resolve().parents[1]

# Measured in a fresh process: RSS when loading starts, then the RSS high-water mark (reset just before). VmHWM, not
# getrusage's ru_maxrss: after exec, ru_maxrss also keeps the high-water mark of the process image that exec replaced,
# here a fork of pytest, which may be larger than the whole load.
CHILD = r"""
import gc, json, os, sys
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.runtime import initialize_runtime
path, tp = sys.argv[1], int(sys.argv[2])
if tp > 1:
    initialize_runtime(tensor_model_parallel_size=tp)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
status = lambda field: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
base = status("VmRSS:")
model = StepVideoDiT.from_pretrained(path, dtype="bf16")
peak = status("VmHWM:")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"growth": peak - base, "weights": weights, "rank": int(os.environ.get("RANK", 0))}))
"""

needs_proc = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux /proc/self/clear_refs to reset the RSS high-water mark")


def _moderate_config():
    # Many narrow layers: the largest tensor (8 MiB) is small beside the 290 MB of weights, so a loader that holds
    # one tensor (or one slice) at a time stays near 1x, and one that holds a second copy of anything is far off.
    return official_config(num_layers=8, num_heads=16, head_dim=64, in_channels=16, caption_channels=(1024, 256))


@pytest.fixture(scope="module")
def moderate(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    cfg = _moderate_config()
    official = random_official_state_dict(cfg, seed=5, dtype=torch.bfloat16)
    write_official_dit(root / "transformer", official, cfg, num_shards=2)
    ours = adapter.official_to_ours(official, cfg["attention_head_dim"])
    weights = sum(t.numel() * t.element_size() for t in ours.values())
    # A training checkpoint: the weights beside optimizer state twice their size (bf16 training's fp32 main weights
    # and Adam moments are 6x), in 8 tensors.
    numel = 2 * weights // 4 // 8
    optimizer = {"state": {i: {"exp_avg": torch.ones(numel), "exp_avg_sq": torch.ones(numel)} for i in range(4)}}
    save_model_state_dict(root / "train", ours, iteration=100, extra={"optimizer": optimizer})
    del official, ours, optimizer
    return root, weights


def _run(args, env_extra=None) -> list:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", **(env_extra or {}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@needs_proc
def test_megatron_training_checkpoint_is_mapped_not_read_whole(moderate):
    """The rank file holds 3x the weights (optimizer state beside them); loading the DiT from it must cost about one
    copy of the weights. The old loader torch.load-ed the whole file and then copied the weights out of it: 3x."""
    root, weights = moderate
    (result,) = _run([sys.executable, "-c", CHILD, str(root / "train"), "1"])
    assert result["weights"] == weights
    assert result["growth"] < 1.4 * weights, f"peak RSS grew {result['growth'] / weights:.2f}x the weights"


@needs_proc
def test_official_folder_peaks_near_one_copy(moderate):
    """No random-init pass, no dict of clones: the old loader peaked above 2x the weights."""
    root, weights = moderate
    (result,) = _run([sys.executable, "-c", CHILD, str(root / "transformer"), "1"])
    assert result["growth"] < 1.4 * weights, f"peak RSS grew {result['growth'] / weights:.2f}x the weights"


@needs_proc
def test_tp2_ranks_read_only_their_part_of_the_official_folder(moderate, tmp_path):
    """At TP=2 each rank's peak stays near its own share (about half the weights), not the whole tensors."""
    root, _ = moderate
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    results = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    str(root / "transformer"), "2"])
    assert len(results) == 2
    for r in results:
        assert r["growth"] < 1.4 * r["weights"], f"rank {r['rank']}: peak RSS grew {r['growth'] / r['weights']:.2f}x"


def test_nothing_is_initialised_on_real_memory(moderate, monkeypatch):
    """Every parameter is loaded, so no init function may touch real memory (the old loader ran nn.Linear's random
    init over the replicated layers, a full pass over their pages)."""
    touched = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor, *args, _original=original, **kwargs):
            if tensor.device.type != "meta":
                touched.append(tuple(tensor.shape))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    root, _ = moderate
    StepVideoDiT.from_pretrained(root / "transformer", dtype="bf16")
    assert touched == []


def test_strictness_is_checked_before_any_memory_is_given(tmp_path, monkeypatch):
    """A checkpoint that does not fit fails from the headers (official) or the pickle's metadata (Megatron), before
    the model gets memory or a tensor is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was given memory before the keys and shapes were checked")

    cfg = official_config()
    sd = random_official_state_dict(cfg)
    del sd["transformer_blocks.1.attn2.wkv.weight"]
    write_official_dit(tmp_path / "official", sd, cfg)
    ours = adapter.official_to_ours(random_official_state_dict(cfg), 16)
    ours["clip_projection.weight"] = torch.zeros(64, 17)
    save_model_state_dict(tmp_path / "mm", ours)
    monkeypatch.setattr(pretrained, "_materialize", refuse)
    with pytest.raises(PretrainedLoadError, match=r"1 missing key\(s\): transformer_blocks.1.attn2.wkv.weight"):
        StepVideoDiT.from_pretrained(tmp_path / "official", dtype="fp32")
    with pytest.raises(PretrainedLoadError, match=r"clip_projection.weight: checkpoint \(64, 17\) vs model \(64, 16\)"):
        StepVideoDiT.from_pretrained(tmp_path / "mm", dtype="fp32", caption_channels=[32, 16])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_official_rank_slices_are_the_adapters_shards(tp):
    """Reading a rank's contiguous rows of the official per-head layout and regrouping them gives exactly what the
    converter's permute-then-shard gives, for every tensor (fused QKV/KV included)."""
    cfg = official_config(use_additional_conditions=True)
    for official_key, tensor in random_official_state_dict(cfg, seed=2).items():
        key, ours = adapter.official_tensor_to_ours(official_key, tensor, 16)
        for rank in range(tp):
            want = adapter.shard_tensor(key, ours, rank, tp)
            dst = torch.empty_like(want, dtype=torch.bfloat16)
            part = tensor[adapter.official_rank_index(key, tensor.shape, rank, tp)]
            views = adapter.official_part_views(dst, key, part, 16)
            views[0].copy_(views[1])
            assert torch.equal(dst, want.to(torch.bfloat16)), (key, rank, tp)


def test_loaded_weights_are_exactly_the_files(tmp_path):
    """TP=1, official (bf16 file into fp32 and bf16 models) and Megatron layout: each parameter is the file's
    tensor, permuted as the adapter says and cast as `Tensor.to` casts (what the old load_state_dict path gave)."""
    for i2v in (False, True):
        cfg = official_config(use_additional_conditions=i2v)
        write_official_dit(tmp_path / f"official{i2v}", random_official_state_dict(cfg, seed=4, dtype=torch.bfloat16),
                           cfg, num_shards=3)
        files = sorted((tmp_path / f"official{i2v}").glob("*.safetensors"))
        on_disk = {k: v for f in files for k, v in load_file(str(f)).items()}
        want = adapter.official_to_ours(on_disk, 16)
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            got = StepVideoDiT.from_pretrained(tmp_path / f"official{i2v}", dtype=dtype).state_dict()
            assert got.keys() == want.keys()
            for key, tensor in want.items():
                assert got[key].dtype == torch_dtype and torch.equal(got[key], tensor.to(torch_dtype)), key
        save_model_state_dict(tmp_path / f"mm{i2v}", want)
        got = StepVideoDiT.from_pretrained(tmp_path / f"mm{i2v}", dtype="fp32").state_dict()
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor.float()), key


def test_file_pages_release_only_mapped_copies(tmp_path):
    """Dropping pages is safe only for a mapping of the file: a dropped page is read from the file again. Memory of
    its own (a tensor not from the file) is never released, since dropping it would zero it."""
    from mindspeed_mm.checkpoint import torch_load

    path = tmp_path / "t.pt"
    torch.save({"a": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(1 << 20)}, path)
    payload = torch_load(path, mmap=True)
    pages = FilePages(path)
    assert pages.holds(payload["a"]) and pages.holds(payload["b"])
    dst = torch.empty(1 << 20)
    pages.copy(dst, payload["a"], chunk_bytes=1 << 16)
    assert pages.released_bytes > 0
    assert torch.equal(dst, torch.arange(1 << 20, dtype=torch.float32))
    assert torch.equal(payload["a"], dst)  # read from the file again
    own = torch.arange(1 << 20, dtype=torch.float32)
    assert not pages.holds(own)
    released = pages.released_bytes
    pages.release(own)
    assert pages.released_bytes == released and torch.equal(own, dst)
