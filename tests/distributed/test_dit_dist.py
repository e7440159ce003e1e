"""StepVideoDiT under TP (with and without sequence parallel), CP (Ulysses, ring, hybrid) and their products on
gloo: output and every gradient vs TP=1.

Each rank first computes the single-process reference (TP = CP = 1, same weights and inputs),
then re-initialises the parallel state with the layout under test and loads the same official
weights through `from_pretrained`. Gradients are compared after averaging over the CP group
(what Megatron DDP does over data x context parallel) and gathering TP shards back to full
shape with the [Q; K; V] / [K; V] layout rules of the state-dict adapter.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

RECOMPUTE = [None, ("full", "block", 1), ("full", "uniform", 2)]
B, F, C, H, W = 2, 4, 8, 4, 6
_folders = {}
_references = {}


def _folder(i2v: bool) -> Path:
    from mindspeed_mm.tiny.dit import write_tiny_dit

    if i2v not in _folders:
        path = Path(tempfile.mkdtemp(prefix=f"dit_dist_r{dist.get_rank()}_")) / "transformer"
        _folders[i2v] = write_tiny_dit(path, use_additional_conditions=i2v, num_shards=2, seed=11)
    return _folders[i2v]


# A latent shape whose 3 x 3 x 5 = 45 tokens no split divides: the pad tokens must be masked and dropped.
ODD = (3, 3, 5)


def _inputs(i2v: bool, shape=None):
    f, h, w = shape or (F, H, W)
    g = torch.Generator().manual_seed(21)
    args = dict(
        latents=torch.randn(B, f, C, h, w, generator=g),
        timestep=torch.tensor([0.15, 0.9]),
        prompt=[torch.randn(B, 7, 32, generator=g), torch.randn(B, 3, 16, generator=g)],
        prompt_mask=[torch.tensor([[1] * 5 + [0] * 2, [1] * 2 + [0] * 5]), torch.ones(B, 3)],
    )
    if i2v:
        cond = torch.zeros(B, f, C, h, w)
        cond[:, 0] = torch.randn(B, C, h, w, generator=g)
        args.update(image_latents=cond, motion_score=torch.tensor([5.0, 3.0]))
    upstream = torch.randn(B, f, C, h, w, generator=g)
    return args, upstream


def _step(model, i2v, shape=None):
    args, upstream = _inputs(i2v, shape)
    args["latents"] = args["latents"].requires_grad_(True)
    if i2v:
        args["image_latents"] = args["image_latents"].requires_grad_(True)
    model.zero_grad()
    out = model(**args)
    (out * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    inputs = {"latents": args["latents"].grad.clone()}
    if i2v:
        inputs["image_latents"] = args["image_latents"].grad.clone()
    return out.detach(), grads, inputs


def _reference(i2v: bool, shape=None):
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    if (i2v, shape) not in _references:
        initialize_model_parallel()
        set_random_seed(1234)
        model = StepVideoDiT.from_pretrained(_folder(i2v), dtype="fp32")
        assert model.parallel.initialized and model.parallel.tp == 1
        _references[i2v, shape] = _step(model, i2v, shape)
    return _references[i2v, shape]


def _close(name, got, want, rtol=1e-4):
    scale = max(1.0, want.abs().max().item())
    if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=2e-5 * scale):
        diff = (got - want).abs().max().item() if got.shape == want.shape else f"shape {tuple(got.shape)}"
        raise AssertionError(f"{name}: max |diff| {diff} vs reference (rank {dist.get_rank()})")


def _full_gradient(key, grad, state):
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    if state.cp > 1:  # Megatron DDP averages over data x context parallel
        grad = grad.clone()
        dist.all_reduce(grad, group=state.cp_group)
        grad /= state.cp
    if state.tp > 1:
        parts = [torch.empty_like(grad) for _ in range(state.tp)]
        dist.all_gather(parts, grad.contiguous(), group=state.tp_group)
        if adapter.full_shape(key, grad.shape, state.tp) == tuple(grad.shape):
            for rank, part in enumerate(parts):  # replicated: every TP rank must agree
                _close(f"{key} grad on TP rank {rank}", part, grad)
        else:
            grad = adapter.merge_tensor(key, parts)
    return grad


def _check_tp_attributes(model):
    """Megatron's grad norm (and so clipping) counts a parameter on every TP rank only when it is marked
    `tensor_model_parallel`; unmarked, it is counted on TP rank 0 alone. Loaded weights (no init) must be marked
    exactly when they are split."""
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter

    for key, param in model.named_parameters():
        split = adapter.full_shape(key, param.shape, 2) != tuple(param.shape)  # split by the plan (at any TP)
        marked = bool(getattr(param, "tensor_model_parallel", False))
        assert marked == split, f"{key}: split over TP {split}, marked tensor_model_parallel {marked}"


def _check_layout(tp: int, cp: int, algo: str = "ulysses_cp_algo", ulysses=None, sp: bool = False, shape=None,
                  recompute_modes=RECOMPUTE):
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed

    options = SequenceParallelOptions(algo, ulysses, sp)
    for i2v in (False, True):
        ref_out, ref_grads, ref_inputs = _reference(i2v, shape)
        initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, options=options)
        set_random_seed(1234)
        model = StepVideoDiT.from_pretrained(_folder(i2v), dtype="fp32")
        state = model.parallel
        assert (state.tp, state.cp, state.sequence_parallel) == (tp, cp, sp)
        assert (state.ulysses, state.ring) == (options.ulysses_size(cp), options.ring_size(cp))
        assert set(model.state_dict()) == set(ref_grads), "parameter names differ from TP=1"
        _check_tp_attributes(model)
        for recompute in recompute_modes:
            model.configure_recompute(*(recompute or (None,)))
            tag = f"tp{tp} cp{cp} {algo} u={state.ulysses} sp={sp} {'i2v' if i2v else 't2v'} recompute={recompute}"
            out, grads, inputs = _step(model, i2v, shape)
            _close(f"{tag} output", out, ref_out)
            for name, want in inputs.items():
                _close(f"{tag} d{name}", inputs[name], want)
            for key, want in ref_grads.items():
                _close(f"{tag} grad {key}", _full_gradient(key, grads[key], model.parallel), want)


@dist_case(world_size=2)
def case_tp2_matches_tp1():
    _check_layout(tp=2, cp=1)


@dist_case(world_size=2)
def case_cp2_matches_tp1():
    _check_layout(tp=1, cp=2)


@dist_case(world_size=4)
def case_tp2_cp2_matches_tp1():
    _check_layout(tp=2, cp=2)


@dist_case(world_size=2)
def case_tp2_megatron_checkpoint_round_trip():
    from megatron.core import parallel_state as ps

    from mindspeed_mm.checkpoint import save_model_state_dict
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=2)
    model = StepVideoDiT.from_pretrained(_folder(True), dtype="fp32").eval()
    box = [tempfile.mkdtemp(prefix="dit_mm_ckpt_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    save_model_state_dict(box[0], model.state_dict(), iteration=10, tp_rank=ps.get_tensor_model_parallel_rank())
    dist.barrier()
    loaded = StepVideoDiT.from_pretrained(box[0], dtype="fp32").eval()  # config read off rank shards
    assert loaded.predictor_config == model.predictor_config
    args, _ = _inputs(True)
    with torch.no_grad():
        assert torch.equal(loaded(**args), model(**args))
    dist.barrier()


@dist_case(world_size=2)
def case_converter_tp2_split_loads_like_official_tp1():
    """The converter's TP=2 split, loaded on 2 ranks, gives the official folder's TP=1 output."""
    from mindspeed_mm.checkpoint.convert import split
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import initialize_model_parallel

    for i2v in (False, True):
        initialize_model_parallel()
        args, _ = _inputs(i2v)
        with torch.no_grad():
            want = StepVideoDiT.from_pretrained(_folder(i2v), dtype="fp32").eval()(**args)
        box = [tempfile.mkdtemp(prefix="dit_converted_") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if dist.get_rank() == 0:
            split(_folder(i2v), Path(box[0]) / "converted", tp_size=2, pp_layers=[2], num_layers=2,
                  log=lambda m: None)
        dist.barrier()
        initialize_model_parallel(tensor_model_parallel_size=2)
        model = StepVideoDiT.from_pretrained(Path(box[0]) / "converted", dtype="fp32").eval()
        assert model.parallel.tp == 2 and model.predictor_config.use_additional_conditions == i2v
        with torch.no_grad():
            _close(f"converted TP=2 output (i2v={i2v})", model(**args), want)
        dist.barrier()


@dist_case(world_size=2)
def case_cp2_heads_constraint_error():
    from mindspeed_mm.config.model import PredictorConfig
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import ParallelConfigError, initialize_model_parallel

    initialize_model_parallel(context_parallel_size=2)
    try:
        StepVideoDiT.build(PredictorConfig(num_layers=1, num_heads=3, head_dim=16, channel_split=[8, 4, 4],
                                                 in_channels=8, out_channels=8, caption_channels=[32, 16],
                                           dtype="fp32"))
    except ParallelConfigError as exc:
        msg = str(exc)
        assert "num_heads 3" in msg and "--tensor-model-parallel-size 1" in msg and "Ulysses degree 2" in msg
    else:
        raise AssertionError("num_heads 3 with CP=2 did not raise")


@dist_case(world_size=2)
def case_cp2_pads_tokens_that_do_not_divide():
    _check_layout(1, 2, shape=ODD, recompute_modes=[None])


@dist_case(world_size=2)
def case_tp2_sequence_parallel_matches_tp1():
    _check_layout(2, 1, sp=True)
    _check_layout(2, 1, sp=True, shape=ODD, recompute_modes=[None])


@dist_case(world_size=2)
def case_ring_cp2_matches_tp1():
    _check_layout(1, 2, algo="megatron_cp_algo")
    _check_layout(1, 2, algo="megatron_cp_algo", shape=ODD, recompute_modes=[None])


@dist_case(world_size=4)
def case_ring_cp4_matches_tp1():
    _check_layout(1, 4, algo="megatron_cp_algo")


@dist_case(world_size=4)
def case_hybrid_cp4_matches_tp1():
    _check_layout(1, 4, algo="hybrid_cp_algo", ulysses=2)
    _check_layout(1, 4, algo="hybrid_cp_algo", ulysses=2, shape=ODD, recompute_modes=[None])


@dist_case(world_size=4)
def case_tp2_sp_ring_cp2_matches_tp1():
    _check_layout(2, 2, algo="megatron_cp_algo", sp=True, shape=ODD, recompute_modes=[None, ("full", "block", 1)])


@dist_case(world_size=8)
def case_tp2_sp_hybrid_cp4_matches_tp1():
    _check_layout(2, 4, algo="hybrid_cp_algo", ulysses=2, sp=True)
    _check_layout(2, 4, algo="hybrid_cp_algo", ulysses=2, sp=True, shape=ODD, recompute_modes=[None])


@dist_case(world_size=4)
def case_tp2_cp2_heads_constraint():
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.runtime import ParallelConfigError, initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    folder = Path(tempfile.mkdtemp(prefix=f"dit_dist_h2_r{dist.get_rank()}_"))
    from mindspeed_mm.tiny.dit import write_tiny_dit

    write_tiny_dit(folder, num_heads=2, head_dim=16, num_layers=1, num_shards=1)
    try:
        StepVideoDiT.from_pretrained(folder, dtype="fp32")
    except ParallelConfigError as exc:
        msg = str(exc)
        assert "num_heads 2" in msg and "= 4" in msg and "model JSON" in msg, msg
    else:
        raise AssertionError("num_heads 2 with TP2 x CP2 did not raise")
    # Ring attention does not split heads: the same 2 heads run at TP2 x ring CP2.
    from mindspeed_mm.parallel.options import SequenceParallelOptions

    initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2,
                              options=SequenceParallelOptions("megatron_cp_algo"))
    assert StepVideoDiT.from_pretrained(folder, dtype="fp32").parallel.ring == 2


test_distributed = pytest_cases(globals())
