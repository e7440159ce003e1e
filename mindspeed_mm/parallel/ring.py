"""Exact ring attention for context parallel (MindSpeed's `--context-parallel-algo megatron_cp_algo`).

    ring_attention(q, k, v, group, key_mask=None, scale=None) -> out
    RingAttention(group)(q, k, v, key_mask=None) -> out

q, k, v and out are [b, s/r, n, d] ("bsnd"): rank i of the ring `group` (size r) holds tokens
[i * s/r, (i + 1) * s/r) of the global sequence of s tokens. `key_mask` is this rank's
[b, s/r] boolean key-padding mask (True = attend), or None when every key is valid; a rank's
whole block may be padding, but every batch row needs at least one valid key in the global
sequence (as for plain SDPA). The attention is bidirectional (not causal), as in the DiT's
self-attention.

Algorithm
---------
Forward. Each rank keeps its queries and passes key/value blocks around the ring: at step t
(t = 0 .. r-1) it holds the block of rank (i - t) mod r. Before computing on the current block
it posts the point-to-point send of that block to the next rank and the receive of the
following block from the previous one (`batch_isend_irecv`), so the transfer overlaps the
compute. Each block gives a partial result in float32,

    S = Q K^T * scale (masked keys -> -inf),   lse_blk = logsumexp(S),   O_blk = softmax(S) V,

and the partials are merged exactly with the log-sum-exp rule

    lse = log(exp(lse_a) + exp(lse_b)),   O = O_a exp(lse_a - lse) + O_b exp(lse_b - lse).

A block whose keys are all masked has lse_blk = -inf and weight 0. The global [s, s] score
matrix is never formed.

Per-block kernel (`BLOCK_KERNEL`). "math" is the formulas above with matmuls on float32 copies,
the queries in chunks of QUERY_CHUNK tokens, so a step materialises at most
[b, n, QUERY_CHUNK, s/r] float32 scores. On CPU tensors "auto" uses aten's fused flash kernel
`_scaled_dot_product_flash_attention_for_cpu` (returns out and lse; tiled, no score matrix) and
its `_backward` on the same float32 inputs, which agree with "math" to float32 rounding (the
tests run both). That kernel reports lse 0 for a row with no valid key; it is set to -inf here.
Other devices use "math"; a fused kernel that returns the lse there is a follow-up.

Backward (a custom autograd.Function). The forward saves q, k, v, the output O and the global
lse only. With D = rowsum(dO * O), the backward passes the K/V blocks around the ring a second
time and for each block recomputes P = exp(S - lse) with the *global* lse, then

    dV_blk += P^T dO,   dS = P * (dO V^T - D),   dQ += dS K * scale,   dK_blk += dS^T Q * scale.

dQ stays on the rank. The float32 (dK_blk, dV_blk) of a block travel around the ring behind
their K/V block, each rank adding its queries' contribution, and end at the rank that owns the
block: the owner computes its own contribution locally at step 0, the accumulator starts at
the next rank (step 1) and is passed on after each rank's step, r-1 sends in all, the last of
which lands on the owner. Receives are posted before the compute they wait for. Every rank
posts its sends to the next rank and its receives from the previous rank in the same order,
so the matching is the same on gloo, NCCL and HCCL.

Communication per attention call
--------------------------------
Bytes sent by each rank (received bytes are equal), with b the batch, s the global tokens,
n the heads on the rank, d the head dimension, r the ring size and e the element size of
q/k/v; the mask is sent as one byte per key, and only when `key_mask` is given:

    forward:   (r-1) * 2 * b * (s/r) * n * d * e     K and V
             + (r-1) * b * (s/r)                     key mask
    backward:  (r-1) * 2 * b * (s/r) * n * d * e     K and V again (not kept from the forward)
             + (r-1) * b * (s/r)                     key mask again
             + (r-1) * 2 * b * (s/r) * n * d * 4     dK and dV, float32 accumulators

The backward re-sends K/V rather than keep all r blocks from the forward, which would cost r
times the K/V activation memory. A ring of size 1 (or group None) sends nothing and runs plain
scaled-dot-product attention on the local tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Queries processed at once in a block step of the "math" kernel: bounds the float32 scores
# to [b, n, QUERY_CHUNK, s/r] (and their gradient in the backward).
QUERY_CHUNK = 2048

# Per-block kernel. "auto": aten's fused CPU flash kernel for CPU tensors, "math" elsewhere.
# "math": always the chunked matmul path (the reference; any device).
BLOCK_KERNEL = "auto"
BLOCK_KERNELS = ("auto", "math")

# Captured at import: P2POp only accepts the real isend/irecv.
_ISEND = dist.isend
_IRECV = dist.irecv


class _Ring:
    """The ring neighbours of this rank in `group`, as global ranks, and the p2p exchanges."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(
        self, send: Sequence[torch.Tensor] = (), recv_like: Sequence[torch.Tensor] = ()
    ) -> Tuple[List[torch.Tensor], list]:
        """Post sends of `send` to the next rank and receives (shaped like `recv_like`) from the
        previous one. Returns the receive buffers and the requests to wait on."""
        ops = [dist.P2POp(_ISEND, t, self.next, group=self.group) for t in send]
        bufs = [torch.empty_like(t) for t in recv_like]
        ops += [dist.P2POp(_IRECV, t, self.prev, group=self.group) for t in bufs]
        reqs = dist.batch_isend_irecv(ops) if ops else []
        return bufs, list(reqs)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows with no valid key) replaced by 0, safe to subtract."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _scores(q, k, mask, scale):
    """[b, n, c, d] x [b, n, sk, d] -> float32 scores [b, n, c, sk], masked keys at -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return s


def _cpu_flash(t: torch.Tensor) -> bool:
    if BLOCK_KERNEL not in BLOCK_KERNELS:
        raise ValueError(f"ring BLOCK_KERNEL must be one of {BLOCK_KERNELS}, got {BLOCK_KERNEL!r}")
    return (
        BLOCK_KERNEL == "auto"
        and t.device.type == "cpu"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _additive_mask(mask, s_q: int):
    """[b, sk] bool -> float32 [b, 1, s_q, sk] bias (0 or -inf), broadcast without a copy."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, None, None, :].expand(-1, 1, s_q, -1)


def _block_forward(q, k, v, mask, scale):
    """Attention of float32 q [b, n, sq, d] on one key block; returns (out [b, n, sq, d], lse [b, n, sq])."""
    if _cpu_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=_additive_mask(mask, q.shape[2]), scale=scale
        )
        if mask is not None:  # the kernel reports lse 0 (out 0) for a row with no valid key
            lse = lse.masked_fill(~mask.any(dim=-1)[:, None, None], float("-inf"))
        return out, lse
    outs, lses = [], []
    for start in range(0, q.shape[2], QUERY_CHUNK):
        s = _scores(q[:, :, start:start + QUERY_CHUNK], k, mask, scale)
        lse = torch.logsumexp(s, dim=-1)
        p = s.sub_(_finite(lse)[..., None]).exp_()
        outs.append(torch.matmul(p, v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _merge(out, lse, block_out, block_lse):
    """Merge two softmax partials exactly with their log-sum-exp (float32)."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    safe = _finite(new_lse)
    out = out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
    return out, new_lse


def _block_backward(q, k, v, mask, d_out, out, lse, delta, scale, dq):
    """Gradients through one key block. q, d_out, out (the global output), dq [b, n, sq, d], lse
    (global) and delta = rowsum(d_out * out) [b, n, sq], all float32; adds to dq in place and
    returns (dk, dv) [b, n, sk, d] of this rank's queries."""
    if _cpu_flash(q):
        # Given the global out and lse, the fused backward computes exactly the block's terms.
        gq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out, q, k, v, out, lse, 0.0, False, attn_mask=_additive_mask(mask, q.shape[2]), scale=scale
        )
        dq += gq
        return dk, dv
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    safe_lse = _finite(lse)
    for start in range(0, q.shape[2], QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        qc, doc = q[:, :, rows], d_out[:, :, rows]
        p = _scores(qc, k, mask, scale).sub_(safe_lse[:, :, rows, None]).exp_()
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = torch.matmul(doc, v.transpose(-1, -2)).sub_(delta[:, :, rows, None]).mul_(p)
        dq[:, :, rows] += torch.matmul(ds, k).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), qc)
    return dk.mul_(scale), dv


def _bnsd32(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).float()


def _mask_bytes(key_mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    return [] if key_mask is None else [key_mask.contiguous().view(torch.uint8)]


def _unpack(kv: torch.Tensor, mask: List[torch.Tensor]):
    return _bnsd32(kv[0]), _bnsd32(kv[1]), (mask[0].view(torch.bool) if mask else None)


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, ring: _Ring, scale: float):
        qf = _bnsd32(q)
        kv = torch.stack((k, v))  # one message for K and V, in their dtype
        mask = _mask_bytes(key_mask)
        out = lse = None
        for step in range(ring.size):
            last = step == ring.size - 1
            if not last:
                incoming, reqs = ring.exchange([kv, *mask], [kv, *mask])
            block_out, block_lse = _block_forward(qf, *_unpack(kv, mask), scale)
            out, lse = _merge(out, lse, block_out, block_lse)
            if not last:
                _wait(reqs)
                kv, mask = incoming[0], incoming[1:]
        out = out.transpose(1, 2).to(q.dtype).contiguous()
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        qf, d_out, outf = _bnsd32(q), _bnsd32(grad_out), _bnsd32(out)
        delta = (d_out * outf).sum(dim=-1)
        dq = torch.zeros_like(qf)
        kv = torch.stack((k, v))
        mask = _mask_bytes(key_mask)
        sends: list = []
        own = None  # (dK, dV) of this rank's block, float32; also the template of the accumulators
        for step in range(ring.size):
            last = step == ring.size - 1
            acc_reqs = []
            if step >= 2:  # the accumulator of the block we hold, from the previous rank's step
                (acc,), acc_reqs = ring.exchange((), [own])
            if not last:
                incoming, reqs = ring.exchange([kv, *mask], [kv, *mask])
            dk, dv = _block_backward(qf, *_unpack(kv, mask), d_out, outf, lse, delta, scale, dq)
            dkv = torch.stack((dk, dv))
            if step == 0:
                own = dkv
            else:
                if acc_reqs:
                    _wait(acc_reqs)
                    dkv += acc
                sends.append((dkv, ring.exchange([dkv])[1]))  # keep the buffer until sent
            if not last:
                _wait(reqs)
                kv, mask = incoming[0], incoming[1:]
        if ring.size > 1:
            (acc,), reqs = ring.exchange((), [own])
            _wait(reqs)
            own += acc
        for _, reqs in sends:
            _wait(reqs)
        dq = dq.transpose(1, 2).to(q.dtype)
        dk = own[0].transpose(1, 2).to(k.dtype)
        dv = own[1].transpose(1, 2).to(v.dtype)
        return dq, dk, dv, None, None, None


def _check(q, k, v, key_mask) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"ring attention needs q, k, v of one shape [b, s, n, d], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be boolean (True = attend), got {key_mask.dtype}")
        if tuple(key_mask.shape) != tuple(k.shape[:2]):
            raise ValueError(f"key_mask must be [b, s_local] = {tuple(k.shape[:2])}, got {tuple(key_mask.shape)}")


def ring_attention(q, k, v, group, key_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Exact bidirectional attention of this rank's queries on the keys of the whole ring; see the
    module docstring. Returns [b, s_local, n, d] in q's dtype."""
    _check(q, k, v, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if group is None or dist.get_world_size(group) == 1:
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        )
        return out.transpose(1, 2)
    return _RingAttentionFn.apply(q, k, v, key_mask, _Ring(group), scale)


class RingAttention(nn.Module):
    """`ring_attention` over `group` as a module with the core-attention signature
    fn(q, k, v, key_mask), so that `UlyssesAttention(RingAttention(ring_group), ulysses_group)`
    gives the hybrid (Ulysses x ring) algorithm."""

    def __init__(self, group, scale: Optional[float] = None):
        super().__init__()
        self.group = group
        self.scale = scale

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ring_attention(q, k, v, self.group, key_mask=key_mask, scale=self.scale)
