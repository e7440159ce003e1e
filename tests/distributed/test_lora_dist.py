"""LoRA on the DiT under TP (with and without sequence parallel) and CP on gloo: output and every adapter gradient
vs one process; the base stays frozen (no gradient).

The adapters are set to the same non-zero values in every layout (drawn whole per layer from a seed, then sliced
as the layout holds them), so the LoRA path is active: with B = 0, as at initialisation, a broken adapter
communication would go unnoticed in the forward.
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

B, F, C, H, W = 2, 2, 8, 4, 6
R = 4
_folders = {}
_references = {}


def _folder(i2v: bool) -> Path:
    from mindspeed_mm.tiny.dit import write_tiny_dit

    if i2v not in _folders:
        path = Path(tempfile.mkdtemp(prefix=f"lora_dist_r{dist.get_rank()}_")) / "transformer"
        _folders[i2v] = write_tiny_dit(path, use_additional_conditions=i2v, num_shards=1, seed=13)
    return _folders[i2v]


def _inputs(i2v: bool):
    g = torch.Generator().manual_seed(5)
    args = dict(latents=torch.randn(B, F, C, H, W, generator=g), timestep=torch.tensor([0.2, 0.8]),
                prompt=[torch.randn(B, 7, 32, generator=g), torch.randn(B, 3, 16, generator=g)],
                prompt_mask=[torch.tensor([[1] * 5 + [0] * 2, [1] * 3 + [0] * 4]), torch.ones(B, 3)])
    if i2v:
        cond = torch.zeros(B, F, C, H, W)
        cond[:, 0] = torch.randn(B, C, H, W, generator=g)
        args.update(image_latents=cond, motion_score=torch.tensor([5.0, 2.0]))
    return args, torch.randn(B, F, C, H, W, generator=g)


def _set_adapters(model):
    """Non-zero adapters, the same at every layout: full matrices per layer from a seed, sliced like the layer."""
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    state = model.parallel
    tp, rank = (state.tp, state.tp_rank) if state.initialized else (1, 0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # by name: layouts add wrapper modules
            a_full = torch.randn(R, module.lora_A.shape[1] * (tp if module.lora_style == "row" else 1), generator=g)
            b_full = torch.randn(module.lora_B.shape[0] * (tp if module.lora_style == "column" else 1), R,
                                 generator=g) * 0.1
            key = f"{name}.weight"
            module.lora_A.copy_(adapter.shard_tensor(key, a_full, rank, tp) if module.lora_style == "row" else a_full)
            module.lora_B.copy_(adapter.shard_tensor(key, b_full, rank, tp) if module.lora_style == "column"
                                else b_full)


def _step(model, i2v):
    args, upstream = _inputs(i2v)
    model.zero_grad()
    out = model(**args)
    (out * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen base parameters got gradients: {frozen[:3]}"
    return out.detach(), grads


def _build(i2v, recompute=None):
    from mindspeed_mm.models.lora import ALL_TARGETS, apply_lora
    from mindspeed_mm.models.predictor import StepVideoDiT

    model = StepVideoDiT.from_pretrained(_folder(i2v), dtype="fp32")
    apply_lora(model, ALL_TARGETS, r=R, alpha=8.0)
    _set_adapters(model)
    model.configure_recompute(*(recompute or (None,)))
    return model


def _reference(i2v):
    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    if i2v not in _references:
        initialize_model_parallel()
        set_random_seed(1)
        _references[i2v] = _step(_build(i2v), i2v)
    return _references[i2v]


def _close(name, got, want):
    scale = max(1.0, want.abs().max().item())
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=2e-5 * scale):
        diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise AssertionError(f"{name}: max |diff| {diff} (rank {dist.get_rank()})")


def _full(key, grad, model):
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    state = model.parallel
    if state.cp > 1:
        grad = grad.clone()
        dist.all_reduce(grad, group=state.cp_group)
        grad /= state.cp
    if state.tp > 1:
        parts = [torch.empty_like(grad) for _ in range(state.tp)]
        dist.all_gather(parts, grad.contiguous(), group=state.tp_group)
        module = model.get_submodule(key.rpartition(".")[0])
        split = (key.endswith("lora_B") and module.lora_style == "column") or \
            (key.endswith("lora_A") and module.lora_style == "row")
        if split:
            return adapter.merge_tensor(f"{key.rpartition('.')[0]}.weight", parts)
        for r, part in enumerate(parts):
            _close(f"{key} on TP rank {r}", part, grad)
    return grad


def _check(tp, cp, algo="ulysses_cp_algo", sp=False):
    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    for i2v in (False, True):
        ref_out, ref_grads = _reference(i2v)
        assert ref_grads and all(k.endswith(("lora_A", "lora_B")) for k in ref_grads), sorted(ref_grads)[:4]
        for recompute in (None, ("full", "block", 1)):
            initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                      options=SequenceParallelOptions(algo, None, sp))
            set_random_seed(1)
            model = _build(i2v, recompute)
            tag = f"tp{tp} cp{cp} {algo} sp={sp} {'i2v' if i2v else 't2v'} recompute={recompute}"
            out, grads = _step(model, i2v)
            _close(f"{tag} output", out, ref_out)
            assert set(grads) == set(ref_grads), tag
            for key, want in ref_grads.items():
                _close(f"{tag} grad {key}", _full(key, grads[key], model), want)


@dist_case(world_size=2)
def case_lora_tp2_matches_one_process():
    _check(2, 1)


@dist_case(world_size=2)
def case_lora_tp2_sequence_parallel_matches_one_process():
    _check(2, 1, sp=True)


@dist_case(world_size=2)
def case_lora_cp2_ulysses_and_ring_match_one_process():
    _check(1, 2)
    _check(1, 2, algo="megatron_cp_algo")


@dist_case(world_size=4)
def case_lora_tp2_sp_cp2_matches_one_process():
    _check(2, 2, sp=True)


test_distributed = pytest_cases(globals())
