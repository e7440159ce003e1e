"""Chunk-parallel VAE decode on 2 gloo ranks: bitwise equal to single-process decode."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed.harness import dist_case, pytest_cases


def _vae():
    from mindspeed_mm.models.ae import StepVideoVAE
    from mindspeed_mm.tiny.vae import TINY_VAE_CONFIG, init_random_weights

    return init_random_weights(StepVideoVAE(device="cpu", **TINY_VAE_CONFIG), seed=0)


def _latents(t, b=1, h=1, w=2, seed=0):
    return torch.randn(b, t, 8, h, w, generator=torch.Generator().manual_seed(seed))


def _count_decoder_calls(vae):
    calls = []
    handle = vae.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    return calls, handle


@dist_case(world_size=2)
def chunk_parallel_decode_is_bitwise_single_process():
    vae = _vae()
    rank = dist.get_rank()
    # 7 latents = chunks of 3, 3, 1: rank 0 decodes two, rank 1 the last (shorter) one.
    for t, b in [(7, 1), (6, 2), (3, 1), (10, 1), (1, 1)]:
        z = _latents(t, b=b, seed=t)
        single = vae.decode(z, group=None)
        calls, handle = _count_decoder_calls(vae)
        parallel = vae.decode(z)  # default: the whole world when more than one rank
        handle.remove()
        assert parallel.shape == single.shape == (b, vae.video_frames(t), 3, 16, 32)
        assert torch.equal(parallel, single), f"t={t}: max diff {(parallel - single).abs().max().item()}"
        n_chunks = -(-t // vae.latent_len)
        per_rank = -(-n_chunks // 2)
        expected = len(range(n_chunks)[rank * per_rank:(rank + 1) * per_rank])
        assert len(calls) == expected, (t, rank, calls)


@dist_case(world_size=2)
def explicit_group_and_opt_out():
    vae = _vae()
    z = _latents(7, seed=1)
    single = vae.decode(z, group=None)
    group = dist.new_group([0, 1])
    assert torch.equal(vae.decode(z, group=group), single)
    # A VAE built with decode_group=None decodes locally even under a multi-rank world.
    vae.decode_group = None
    calls, handle = _count_decoder_calls(vae)
    assert torch.equal(vae.decode(z), single)
    handle.remove()
    assert len(calls) == 3


@dist_case(world_size=2)
def chunk_parallel_with_tiling():
    vae = _vae()
    vae.enable_tiling(32, 16)
    z = _latents(7, h=2, w=3, seed=2)
    assert torch.equal(vae.decode(z), vae.decode(z, group=None))


@dist_case(world_size=2)
def different_latents_per_rank_are_refused():
    from mindspeed_mm.models.ae import VAEInputError

    vae = _vae()
    z = _latents(6, seed=10 + dist.get_rank())
    try:
        vae.decode(z)
    except VAEInputError as exc:
        assert "hold different latents" in str(exc) and "group=None" in str(exc)
    else:
        raise AssertionError("decode accepted different latents on the ranks of its group")
    z_shape = _latents(6 if dist.get_rank() == 0 else 3, seed=3)
    try:
        vae.decode(z_shape)
    except VAEInputError as exc:
        assert "(1, 6, 8, 1, 2)" in str(exc) and "(1, 3, 8, 1, 2)" in str(exc)
    else:
        raise AssertionError("decode accepted latents of different shapes on the ranks of its group")


test_distributed = pytest_cases(globals())
