"""The per-block communication formulas (mindspeed_mm/parallel/traffic.py, docs/architecture.md) against the bytes
the real collectives send.

A DiT of 2 blocks and one of 1 block run forward and backward under the same layout with every torch.distributed
call counted; the difference is one block's traffic, which must equal `block_traffic` for TP, TP + sequence
parallel, Ulysses, ring and their products, with and without the padding mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases

HEADS, HEAD_DIM = 4, 8
B, LLM_LEN, CLIP_LEN = 2, 6, 3


def _config(layers: int):
    from mindspeed_mm.config.model import PredictorConfig

    return PredictorConfig(num_layers=layers, num_heads=HEADS, head_dim=HEAD_DIM, channel_split=[4, 2, 2],
                           in_channels=4, out_channels=4, caption_channels=[16, 8], dtype="fp32")


def _count(layers: int, latent_shape):
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.parallel.traffic import CommunicationCounter
    from mindspeed_mm.runtime import set_random_seed

    set_random_seed(5)
    model = StepVideoDiT.build(_config(layers))
    g = torch.Generator().manual_seed(3)
    f, h, w = latent_shape
    latents = torch.randn(B, f, 4, h, w, generator=g)
    prompt = [torch.randn(B, LLM_LEN, 16, generator=g), torch.randn(B, CLIP_LEN, 8, generator=g)]
    mask = [torch.tensor([[1] * 4 + [0] * 2, [1] * 2 + [0] * 4]), torch.ones(B, CLIP_LEN)]
    with CommunicationCounter() as counter:
        out = model(latents, torch.tensor([0.3, 0.7]), prompt, mask)
        counter.phase = "backward"
        out.backward(torch.randn(out.shape, generator=g))
    return counter.sent


def _check(tp: int, cp: int, algo: str = "ulysses_cp_algo", ulysses=None, sp: bool = False, shape=(4, 4, 6)):
    from mindspeed_mm.parallel.options import SequenceParallelOptions
    from mindspeed_mm.parallel.traffic import BlockShape, Layout, block_traffic
    from mindspeed_mm.runtime import initialize_model_parallel

    options = SequenceParallelOptions(algo, ulysses, sp)
    initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, options=options)
    one, two = _count(1, shape), _count(2, shape)
    tokens = shape[0] * shape[1] * shape[2]
    shards = cp * (tp if sp else 1)
    padded = -(-tokens // shards) * shards
    text_len = CLIP_LEN + 4  # the longest valid Step-LLM prompt, after cropping
    want = block_traffic(BlockShape(B, padded, HEADS * HEAD_DIM, HEADS, text_len, e=4),
                         Layout(tp, cp, options.ulysses_size(cp), sp), masked=padded > tokens)
    for phase in ("forward", "backward"):
        expected = sum(m[phase] for m in want.values())
        got = two.get(phase, 0.0) - one.get(phase, 0.0)
        assert abs(got - expected) <= 1e-6 * max(1.0, expected), (
            f"tp{tp} cp{cp} {algo} u={ulysses} sp={sp} shape={shape} {phase}: counted {got:.0f} bytes per block, "
            f"formula {expected:.0f} ({want}) (rank {dist.get_rank()})")


@dist_case(world_size=2)
def case_tp2_and_sequence_parallel():
    _check(2, 1)
    _check(2, 1, sp=True)
    _check(2, 1, sp=True, shape=(3, 3, 5))


@dist_case(world_size=2)
def case_ulysses_and_ring_cp2():
    _check(1, 2)
    _check(1, 2, shape=(3, 3, 5))
    _check(1, 2, algo="megatron_cp_algo")
    _check(1, 2, algo="megatron_cp_algo", shape=(3, 3, 5))


@dist_case(world_size=2)
def case_a_wrong_formula_is_caught():
    # Sequence parallel counted as plain TP: the backward differs (9 vs 6 activation transfers), and so must fail.
    from mindspeed_mm.parallel import traffic

    real = traffic.block_traffic
    traffic.block_traffic = lambda shape, layout, masked=False: real(
        shape, traffic.Layout(layout.tp, layout.cp, layout.ulysses, False), masked)
    try:
        _check(2, 1, sp=True)
    except AssertionError:
        pass
    else:
        raise AssertionError("the counter did not tell sequence parallel from plain TP")
    finally:
        traffic.block_traffic = real


@dist_case(world_size=4)
def case_hybrid_and_products():
    _check(1, 4, algo="hybrid_cp_algo", ulysses=2)
    _check(1, 4, algo="hybrid_cp_algo", ulysses=2, shape=(3, 3, 5))
    _check(2, 2, algo="megatron_cp_algo", sp=True)
    _check(2, 2, sp=False)


test_distributed = pytest_cases(globals())
