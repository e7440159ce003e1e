"""Ring attention (`mindspeed_mm.parallel.ring`) on 2 and 4 gloo ranks against full attention.

Every rank draws the same full q, k, v and upstream gradient from one seed, runs the ring on
its contiguous chunk and compares the output and the q/k/v gradients with float64
single-process attention on that chunk. Also: Ulysses x ring (hybrid) with Megatron's
hierarchical group layout, two independent rings on subgroups {0,2} and {1,3}, the bytes each
rank sends against the formulas of the module docstring, and a wrong (non-log-sum-exp) merge
that the tolerance must catch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.harness import dist_case, pytest_cases

B, N, D = 2, 4, 8
S_LOCAL = 8
RTOL_FP32 = 1e-5
RTOL_BF16 = 2e-2
_groups = {}


# ---- helpers ------------------------------------------------------------------------------------


def _group(layout):
    """new_group for every rank list of `layout` (all ranks, same order); this rank's group."""
    key = tuple(tuple(ranks) for ranks in layout)
    if key not in _groups:
        mine = None
        for ranks in key:
            group = dist.new_group(list(ranks))
            if dist.get_rank() in ranks:
                mine = group
        _groups[key] = mine
    return _groups[key]


def _inputs(s, seed, dtype=torch.float32, lengths=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v, up = (torch.randn(B, s, N, D, generator=g).to(dtype) for _ in range(4))
    mask = None
    if lengths is not None:
        mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    return q, k, v, up, mask


def _reference(q, k, v, up, mask):
    """Float64 full attention: output and q/k/v gradients for upstream gradient `up`."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
    ).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), up.double())
    return out.detach(), grads


def _chunk(x, index, parts):
    return None if x is None else x.chunk(parts, dim=1)[index].contiguous()


def _run(fn, q, k, v, up, mask, index, parts):
    """Run fn(q, k, v, key_mask) on chunk `index` of `parts`; output and q/k/v gradients."""
    q, k, v = (_chunk(t, index, parts).requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, _chunk(mask, index, parts))
    out.backward(_chunk(up, index, parts))
    return out.detach(), (q.grad, k.grad, v.grad)


def _rel_err(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _compare(got, want, index, parts, rtol):
    """Assert the ring's (out, grads) match the reference's chunk `index` within rtol."""
    (out, grads), (ref_out, ref_grads) = got, want
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = _rel_err(a, _chunk(b, index, parts))
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.1g}"


def _ring_fn(group):
    from mindspeed_mm.parallel import ring_attention

    return lambda q, k, v, key_mask: ring_attention(q, k, v, group, key_mask=key_mask)


@contextmanager
def _ring_setting(name, value):
    from mindspeed_mm.parallel import ring

    saved = getattr(ring, name)
    setattr(ring, name, value)
    try:
        yield
    finally:
        setattr(ring, name, saved)


def _check_world_ring(dtype=torch.float32, lengths=None, rtol=RTOL_FP32, seed=0, query_chunk=3):
    """The ring over all ranks with both per-block kernels: the fused CPU flash kernel ("auto" on
    CPU) and the chunked "math" path with `query_chunk` queries per chunk."""
    world, rank = dist.get_world_size(), dist.get_rank()
    data = _inputs(S_LOCAL * world, seed, dtype, lengths)
    want = _reference(*data)
    for kernel in ("auto", "math"):
        with _ring_setting("BLOCK_KERNEL", kernel), _ring_setting("QUERY_CHUNK", query_chunk):
            try:
                _compare(_run(_ring_fn(dist.group.WORLD), *data, rank, world), want, rank, world, rtol)
            except AssertionError as err:
                raise AssertionError(f"BLOCK_KERNEL={kernel}: {err}") from None


@contextmanager
def _count_p2p_bytes():
    """Count bytes this rank sends and receives through isend/irecv/batch_isend_irecv."""
    counts = {"sent": 0, "recv": 0}
    orig_batch, orig_isend, orig_irecv = dist.batch_isend_irecv, dist.isend, dist.irecv

    def nbytes(t):
        return t.numel() * t.element_size()

    def batch(ops):
        for op in ops:
            counts["sent" if op.op is orig_isend else "recv"] += nbytes(op.tensor)
        return orig_batch(ops)

    def isend(tensor, *args, **kwargs):
        counts["sent"] += nbytes(tensor)
        return orig_isend(tensor, *args, **kwargs)

    def irecv(tensor, *args, **kwargs):
        counts["recv"] += nbytes(tensor)
        return orig_irecv(tensor, *args, **kwargs)

    dist.batch_isend_irecv, dist.isend, dist.irecv = batch, isend, irecv
    try:
        yield counts
    finally:
        dist.batch_isend_irecv, dist.isend, dist.irecv = orig_batch, orig_isend, orig_irecv


def _expected_bytes(b, s, n, d, r, e, masked):
    """The module docstring's formulas: (forward, backward) bytes sent per rank."""
    kv = (r - 1) * 2 * b * (s // r) * n * d * e
    mask = (r - 1) * b * (s // r) if masked else 0
    dkv = (r - 1) * 2 * b * (s // r) * n * d * 4
    return kv + mask, kv + mask + dkv


def _check_bytes(group, index, r, data, dtype):
    q, k, v, up, mask = data
    q, k, v = (_chunk(t, index, r).requires_grad_(True) for t in (q, k, v))
    from mindspeed_mm.parallel import ring_attention

    with _count_p2p_bytes() as counts:
        out = ring_attention(q, k, v, group, key_mask=_chunk(mask, index, r))
        forward = dict(counts)
        out.backward(_chunk(up, index, r))
    backward = {key: counts[key] - forward[key] for key in counts}
    e = torch.tensor([], dtype=dtype).element_size()
    want_fwd, want_bwd = _expected_bytes(B, S_LOCAL * r, N, D, r, e, mask is not None)
    assert forward == {"sent": want_fwd, "recv": want_fwd}, (forward, want_fwd)
    assert backward == {"sent": want_bwd, "recv": want_bwd}, (backward, want_bwd)


def _check_wrong_merge_caught():
    """Average the block outputs instead of the log-sum-exp merge: the comparison must fail."""
    from mindspeed_mm.parallel import ring

    def average(out, lse, block_out, block_lse):
        return (block_out, block_lse) if out is None else ((out + block_out) / 2, lse)

    world, rank = dist.get_world_size(), dist.get_rank()
    data = _inputs(S_LOCAL * world, seed=5)
    saved, ring._merge = ring._merge, average
    try:
        out, _ = _run(_ring_fn(dist.group.WORLD), *data, rank, world)
    finally:
        ring._merge = saved
    ref_out, _ = _reference(*data)
    err = _rel_err(out, _chunk(ref_out, rank, world))
    assert err > 100 * RTOL_FP32, f"a wrong merge is within {err:.3g}: the tolerance cannot catch it"
    # The same data through the real merge passes.
    _compare(_run(_ring_fn(dist.group.WORLD), *data, rank, world), _reference(*data), rank, world, RTOL_FP32)


# ---- 2 ranks ------------------------------------------------------------------------------------


@dist_case(world_size=2)
def case_ring2_fp32():
    _check_world_ring()


@dist_case(world_size=2)
def case_ring2_padding_last_rank_masked():
    # s = 16: rank 1's keys are all padding; rank 0's are partly padding in batch 1.
    _check_world_ring(lengths=[8, 5], seed=1)


@dist_case(world_size=2)
def case_ring2_bf16():
    _check_world_ring(dtype=torch.bfloat16, lengths=[11, 6], rtol=RTOL_BF16, seed=2)


@dist_case(world_size=2)
def case_ring2_group_of_one_is_plain_attention():
    from mindspeed_mm.parallel import ring_attention

    data = _inputs(S_LOCAL, seed=3, lengths=[8, 3])
    got = _run(lambda q, k, v, m: ring_attention(q, k, v, None, key_mask=m), *data, 0, 1)
    _compare(got, _reference(*data), 0, 1, RTOL_FP32)


@dist_case(world_size=2)
def case_ring2_bytes():
    world = dist.get_world_size()
    _check_bytes(dist.group.WORLD, dist.get_rank(), world, _inputs(S_LOCAL * world, 4), torch.float32)
    data = _inputs(S_LOCAL * world, 4, torch.bfloat16, lengths=[9, 3])
    _check_bytes(dist.group.WORLD, dist.get_rank(), world, data, torch.bfloat16)


@dist_case(world_size=2)
def case_ring2_wrong_merge_is_caught():
    _check_wrong_merge_caught()


# ---- 4 ranks ------------------------------------------------------------------------------------


@dist_case(world_size=4)
def case_ring4_fp32():
    _check_world_ring(query_chunk=5)


@dist_case(world_size=4)
def case_ring4_padding_last_rank_masked():
    # s = 32: rank 3's keys are all padding, rank 2's too in batch 1.
    _check_world_ring(lengths=[21, 11], seed=1)


@dist_case(world_size=4)
def case_ring4_bf16():
    _check_world_ring(dtype=torch.bfloat16, lengths=[30, 17], rtol=RTOL_BF16, seed=2)


@dist_case(world_size=4)
def case_ring4_bytes():
    data = _inputs(S_LOCAL * 4, 4, lengths=[30, 10])
    _check_bytes(dist.group.WORLD, dist.get_rank(), 4, data, torch.float32)


@dist_case(world_size=4)
def case_ring4_wrong_merge_is_caught():
    _check_wrong_merge_caught()


@dist_case(world_size=4)
def case_two_rings_on_subgroups():
    """Rings {0,2} and {1,3} attend over different sequences at once: peers are global ranks."""
    rank = dist.get_rank()
    group = _group([[0, 2], [1, 3]])
    index = dist.get_rank(group)
    lengths = [[12, 7], [16, 9]][rank % 2]  # ring {0,2}: rank 2's block masked in batch 1
    data = _inputs(S_LOCAL * 2, seed=10 + rank % 2, lengths=lengths)
    got = _run(_ring_fn(group), *data, index, 2)
    _compare(got, _reference(*data), index, 2, RTOL_FP32)
    _check_bytes(group, index, 2, data, torch.float32)


@dist_case(world_size=4)
def case_hybrid_ulysses2_ring2():
    """UlyssesAttention(RingAttention(ring), ulysses) with Megatron's hierarchical CP groups of sizes
    [2, 2]: Ulysses over consecutive ranks [0,1], [2,3]; ring across them [0,2], [1,3]."""
    from mindspeed_mm.parallel import RingAttention, UlyssesAttention

    rank = dist.get_rank()
    ulysses = _group([[0, 1], [2, 3]])
    ring = _group([[0, 2], [1, 3]])
    hybrid = UlyssesAttention(RingAttention(ring), ulysses)
    # s = 32; after the all-to-all ring rank 1 holds tokens [16, 32): all padding.
    data = _inputs(S_LOCAL * 4, seed=7, lengths=[14, 9])
    got = _run(hybrid, *data, rank, 4)
    _compare(got, _reference(*data), rank, 4, RTOL_FP32)


test_distributed = pytest_cases(globals())
