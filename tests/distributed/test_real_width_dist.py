"""One real-width StepVideo block (hidden 6144 = 48 heads x 128, in_channels 64; narrow caption channels) under
TP2 + sequence parallel x CP2 (Ulysses) on 4 gloo ranks matches TP1: output and every parameter gradient.

Real width matters for what tiny models cannot show: the head-major layout of the fused QKV at 48 heads, the
Ulysses exchange of 12 heads per rank, the modulation's 6 x 6144 split. The model is bf16 (in fp32 four ranks of
weights and gradients, 4 x 3.4 GB, do not fit a 24 GB machine next to the reference). Every tensor is compared
with an fp32 one-process run from the same weights, by relative error norm ||got - ref|| / ||ref||, and the
parallel bf16 run must be no worse than twice the one-process bf16 run's error (at least 5e-3): bf16 rounding
alone stays there (the LayerNorm weight gradients, sums with much cancellation, reach 2e-2 in both), a layout bug
(a wrong head order, a missing reduction) gives order 1. Memory is also kept in bounds by
running the parallel model first, writing its TP-rank gradients to disk, freeing it, and only then computing the
one-process reference on rank 0. The caption channels are narrow (the text projections are plain replicated
layers; their width is not what is tested).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

B, FRAMES, H, W = 1, 2, 10, 16  # 320 tokens
LLM_LEN, CLIP_LEN = 24, 8


def _shared_tmp() -> Path:
    box = [tempfile.mkdtemp(prefix="mm_real_width_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _wait_for(path: Path, timeout_s: float = 900) -> None:
    # A file, not a gloo barrier: gloo's barrier spins and would starve rank 0 of the CPU it computes with.
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.5)


def _inputs():
    g = torch.Generator().manual_seed(4)
    return dict(latents=torch.randn(B, FRAMES, 64, H, W, generator=g), timestep=torch.tensor([0.4]),
                prompt=[torch.randn(B, LLM_LEN, 256, generator=g), torch.randn(B, CLIP_LEN, 128, generator=g)],
                prompt_mask=[torch.tensor([[1] * 20 + [0] * 4]), torch.ones(B, CLIP_LEN)]), \
        torch.randn(B, FRAMES, 64, H, W, generator=g)


def _run(model):
    args, upstream = _inputs()
    out = model(**args)
    (out * upstream).sum().backward()
    return out.detach()


@dist_case(world_size=4)
def case_real_width_block_tp2_sp_cp2_matches_tp1():
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.checkpoint import stepvideo_adapter as adapter
    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.runtime import initialize_model_parallel, set_random_seed
    from mindspeed_mm.tiny.dit import write_tiny_dit

    root = _shared_tmp()
    if dist.get_rank() == 0:
        write_tiny_dit(root / "transformer", num_layers=1, num_heads=48, head_dim=128, in_channels=64,
                       caption_channels=(256, 128), num_shards=2, seed=9)
    dist.barrier()

    initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2,
                              options=SequenceParallelOptions(sequence_parallel=True))
    set_random_seed(1234)
    model = StepVideoDiT.from_pretrained(root / "transformer", dtype="bf16")
    state = model.parallel
    assert (state.tp, state.cp, state.sequence_parallel, state.ulysses) == (2, 2, True, 2)
    out = _run(model)
    grads = {}
    for key, param in model.named_parameters():
        grad = param.grad
        dist.all_reduce(grad, group=state.cp_group)  # Megatron DDP averages over data x context parallel
        grads[key] = grad / state.cp
    if state.cp_rank == 0:
        torch.save(grads, root / f"grads_tp{state.tp_rank}.pt")
        if state.tp_rank == 0:
            torch.save(out, root / "out.pt")
    del model, grads
    dist.barrier()

    if dist.get_rank() == 0:
        # The plain single-process model (nn.Linear layers, no groups): creating groups is collective, and the
        # other ranks are only waiting.
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        runs = {}
        for dtype in ("fp32", "bf16"):
            reference = StepVideoDiT.from_pretrained(root / "transformer", dtype=dtype)
            out = _run(reference).float()
            runs[dtype] = (out, {k: p.grad.float() for k, p in reference.named_parameters()})
            del reference
        errors = []
        worst = [0.0]

        def relative(got, want):
            return ((got.float() - want).norm() / want.norm().clamp_min(1e-12)).item()

        def check(name, got, want, single):
            error, allowed = relative(got, want), max(2 * relative(single, want), 5e-3)
            worst[0] = max(worst[0], error / allowed)
            if error > allowed:
                errors.append(f"{name}: relative error {error:.3e}, one-process bf16 {allowed / 2:.3e}")

        check("output", torch.load(root / "out.pt"), runs["fp32"][0], runs["bf16"][0])
        shards = [torch.load(root / f"grads_tp{r}.pt", mmap=True) for r in range(2)]
        for key, want in runs["fp32"][1].items():
            parts = [s[key] for s in shards]
            if adapter.full_shape(key, parts[0].shape, 2) == tuple(parts[0].shape):
                if not torch.equal(parts[1], parts[0]):
                    errors.append(f"grad {key}: TP ranks differ")
                got = parts[0]
            else:
                got = adapter.merge_tensor(key, parts)
            check(f"grad {key}", got, want, runs["bf16"][1][key])
        print(f"real width: worst error / allowed {worst[0]:.2f} over the output and {len(shards[0])} gradients")
        (root / "done").write_text("\n".join(errors))
        assert not errors, "\n".join(errors)
    else:
        _wait_for(root / "done")
        assert (root / "done").read_text() == "", "rank 0 found differences"


test_distributed = pytest_cases(globals())
