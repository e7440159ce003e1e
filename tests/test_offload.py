"""Layer-wise CPU offload of the DiT's blocks for single-device inference (models/common/offload.py,
dit_layerwise_offload): the same latents, at most the running block and the prefetched next one resident, blocks the
step cache skips never copied, and the settings it cannot run with refused. On this CPU machine the copies are
no-ops; what is tested is which blocks are resident when (the device saving needs an accelerator; the memory planner
counts it, tests/test_memory_plan.py). The runner with it on, under CFG parallel, is a case of
tests/distributed/test_pipeline_dist.py."""

from __future__ import annotations

import argparse

import pytest
import torch

from mindspeed_mm.config import from_dict
from mindspeed_mm.config.model import MMModelConfig
from mindspeed_mm.inference import StepVideoPipeline
from mindspeed_mm.inference.runner import InferenceInputError, check_offload_options
from mindspeed_mm.models.ae import StepVideoVAE
from mindspeed_mm.models.common.offload import LayerwiseOffload
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
from mindspeed_mm.tiny.dit import write_tiny_dit
from mindspeed_mm.tiny.download import TINY_WIDTHS, write_tiny_download

PROMPTS = ["a cat walks along a windowsill", "一只猫"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("offload") / "weights"
    sections = write_tiny_download(root, task="t2v")
    w = TINY_WIDTHS  # four blocks, so that "two resident" is fewer than all of them
    write_tiny_dit(root / "transformer4", num_shards=1, seed=1, num_layers=4, num_heads=w["dit_heads"],
                   head_dim=w["dit_head_dim"], in_channels=sections["ae"]["z_channels"],
                   caption_channels=(w["llm_hidden"], w["clip_hidden"]))
    sections["predictor"] = dict(sections["predictor"], num_layers=4, from_pretrained=str(root / "transformer4"))
    cfg = from_dict(MMModelConfig, sections, source="tiny")
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)

    def pipeline():
        dit = StepVideoDiT.from_pretrained(cfg.predictor.from_pretrained, cfg.predictor).eval()
        dit.requires_grad_(False)
        return StepVideoPipeline(dit, StepVideoVAE.from_config(cfg.ae), encoder, None, input_size=(17, 32, 32),
                                 num_inference_steps=4)

    plain = pipeline()
    return plain, pipeline, plain.encode_prompts(PROMPTS)


class _Residency:
    """Records, while each block runs, which blocks the offload holds on the device."""

    def __init__(self, offload: LayerwiseOffload):
        self.seen = []
        for i, block in enumerate(offload.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self.seen.append((i, frozenset(offload.resident))))


def test_offloaded_sampling_gives_the_same_latents_with_two_blocks_resident(setup):
    plain, pipeline, text = setup
    base = plain.generate(text=text, seeds=[3, 4], output="latent")
    pipe = pipeline()
    blocks = len(pipe.dit.transformer_blocks)
    assert blocks >= 3  # else "at most two" says nothing
    offload = pipe.dit.offload_blocks("cpu")
    residency = _Residency(offload)  # registered after the offload's hooks: sees the state the block runs in
    latents = pipe.generate(text=text, seeds=[3, 4], output="latent")
    assert torch.equal(latents, base)
    steps = 4
    # each block copied once per forward (the prefetch is used), plus the first block once more: the last block
    # prefetches the next step's first
    assert offload.loads == steps * blocks + 1
    assert len(residency.seen) == steps * blocks
    for i, resident in residency.seen:
        assert resident == {i, (i + 1) % blocks}, (i, resident)
    assert offload.max_resident == 2
    assert offload.resident == {0}  # the next step's first block, prefetched
    assert offload.host_bytes() == sum(p.numel() * p.element_size() for p in pipe.dit.transformer_blocks.parameters())
    offload.remove()
    assert torch.equal(pipe.generate(text=text, seeds=[3, 4], output="latent"), base)


def test_an_unmerged_lora_adapter_travels_with_its_blocks(setup):
    """The runner applies --lora-load before offloading: the adapters live in the blocks and are copied with them."""
    from mindspeed_mm.models.lora import apply_lora, lora_parameters

    _, pipeline, text = setup
    pipe = pipeline()
    apply_lora(pipe.dit, r=4)
    torch.manual_seed(5)
    for param in lora_parameters(pipe.dit):
        param.data.normal_(0, 0.05)  # B is zero after apply_lora: give the adapter an effect
    pipe.dit.requires_grad_(False)
    plain = pipe.generate(text=text, seeds=[3, 4], output="latent")
    offload = pipe.dit.offload_blocks("cpu")
    adapters = {id(p) for p in lora_parameters(pipe.dit)}
    assert adapters <= {id(t) for entries in offload._host for t, _ in entries}
    assert torch.equal(pipe.generate(text=text, seeds=[3, 4], output="latent"), plain)


def test_blocks_skipped_by_the_step_cache_are_never_copied(setup):
    _, pipeline, text = setup
    pipe = pipeline()
    blocks = len(pipe.dit.transformer_blocks)
    offload = pipe.dit.offload_blocks("cpu")
    pipe.first_block_cache_threshold = 100.0  # every step after the first reuses the other blocks' residual
    pipe.generate(text=text, seeds=[3, 4], output="latent")
    full, reused = pipe.last_cache_stats
    assert (full, reused) == (1, 3)
    # the full step copies every block and prefetches the next step's first; a cached step then copies one block
    # (the first cached step prefetches the second block, which stays; each later one brings back the first)
    assert offload.loads == blocks + 1 + reused
    assert offload.max_resident == 2


def test_host_slabs_hold_the_weights_with_little_waste():
    """The released block's tensors, scaled down 1,024x (D = 6144 -> bf16 weights of 3D^2, D^2, D^2, 2D^2, D^2, 4D^2,
    4D^2 and small norms), 48 blocks, in 1 MiB slabs: each host copy equals its tensor, none overlaps another, and
    the slabs hold under 1.05x the weights (pinning tensor by tensor rounds each up to a power of two: 1.6x)."""
    from mindspeed_mm.models.common.offload import move_to_host_slabs

    d2 = 6144 * 6144 // 1024  # bf16 elements of D^2, scaled
    shapes = [3 * d2, d2, d2, 2 * d2, d2, 4 * d2, 4 * d2, 6144, 6144, 128, 128]
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(48) for n in shapes]
    originals = [t.clone() for t in tensors]
    copies, slab_bytes = move_to_host_slabs(tensors, pin=False, slab_bytes=1 << 20)
    weights = sum(t.numel() * t.element_size() for t in originals)
    per_tensor_pinned = sum(1 << (t.numel() * t.element_size() - 1).bit_length() for t in originals)
    assert slab_bytes < 1.05 * weights < per_tensor_pinned / 1.5
    spans = []
    for tensor, copy, original in zip(tensors, copies, originals):
        assert tensor.data_ptr() == copy.data_ptr() and torch.equal(copy, original)  # moved, values kept
        spans.append((copy.data_ptr(), copy.data_ptr() + copy.numel() * copy.element_size()))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_offload_refuses_training_and_settings_it_cannot_run(setup):
    _, pipeline, _ = setup
    dit = pipeline().dit
    dit.transformer_blocks[1].requires_grad_(True)
    with pytest.raises(ValueError, match="block 1 has parameters that require gradients"):
        LayerwiseOffload(dit.transformer_blocks, "cpu")
    dit.requires_grad_(False)
    offload = LayerwiseOffload(dit.transformer_blocks, "cpu")
    x = torch.zeros(1)  # the hook refuses before the block reads anything
    with pytest.raises(RuntimeError, match="without autograd"):
        with torch.enable_grad():
            dit.transformer_blocks[0](x, None, None, None, None, None)
    offload.remove()

    def args(tp=1, cp=1, compile=False, offload=True):
        cfg = from_dict(MMModelConfig, {"dit_layerwise_offload": offload}, source="inference.json")
        return argparse.Namespace(mm=argparse.Namespace(model=cfg), mm_model="inference.json",
                                  tensor_model_parallel_size=tp, context_parallel_size=cp, use_torch_compile=compile)

    check_offload_options(args())
    check_offload_options(args(tp=2, offload=False))
    with pytest.raises(InferenceInputError, match="inference.json: dit_layerwise_offload .* --tensor-model-parallel"):
        check_offload_options(args(tp=2))
    with pytest.raises(InferenceInputError, match="context-parallel-size 2"):
        check_offload_options(args(cp=2))
    with pytest.raises(InferenceInputError, match="--use-torch-compile"):
        check_offload_options(args(compile=True))
