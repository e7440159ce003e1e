"""Communication of one DiT block, as formulas and as counted on the real collectives.

`block_traffic(...)` gives the bytes each rank sends for one transformer block, forward and backward, per
mechanism (TP, TP + sequence parallel, Ulysses, ring), from the shapes and the group sizes;
docs/architecture.md prints the same formulas. `CommunicationCounter` wraps the torch.distributed calls
(and the ones Megatron-core bound at import) and adds up what each call sends, so a test can check the
formulas on a real block (tests/distributed/test_traffic_dist.py) and a user can measure a layout.

Bytes sent per rank by a collective over P ranks, as the bandwidth-optimal (ring) algorithms move them, N
being the bytes of the full tensor: all-reduce 2 (P-1)/P N, all-gather and reduce-scatter (P-1)/P N,
all-to-all (P-1)/P N; a point-to-point send N. What a library really sends can differ by its algorithm
(a tree all-reduce on few ranks); these are the volumes that set the time on large groups.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class BlockShape:
    """One block's sizes on one data-parallel replica: b samples of s tokens (padded for the split), hidden d
    in n heads of head_dim, text_len text keys (CLIP + Step-LLM after cropping), e bytes per element."""

    b: int
    s: int
    d: int
    n: int
    text_len: int
    e: int = 2

    @property
    def head_dim(self) -> int:
        return self.d // self.n


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    ulysses: int = 1  # CP = ulysses x ring
    sequence_parallel: bool = False

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses


def _share(p: int) -> float:
    return (p - 1) / p


def block_traffic(shape: BlockShape, layout: Layout, masked: bool = False) -> Dict[str, Dict[str, float]]:
    """{mechanism: {"forward": bytes, "backward": bytes}} sent by one rank for one block (no recompute; full
    recompute adds one more forward). `masked`: the token split padded the sequence, so Ulysses gathers and the
    ring passes a one-byte-per-key mask."""
    b, s, d, e = shape.b, shape.s, shape.d, shape.e
    t, c, u, r = layout.tp, layout.cp, layout.ulysses, layout.ring
    tokens = b * s // c  # the tokens of a CP rank: what attention and the matmuls see
    act = tokens * d * e  # one (b, s/c, d) activation
    out: Dict[str, Dict[str, float]] = {}
    if t > 1:
        text = b * shape.text_len * d * e
        # q/k RMSNorm weights (2 per attention) act on local heads: their gradients are all-reduced over TP.
        qk_norms = 4 * 2 * _share(t) * shape.head_dim * e
        if layout.sequence_parallel:
            # Forward: 3 column layers all-gather the token stream, 3 row layers reduce-scatter it. Backward:
            # the column layers gather their input again (for the weight gradient) and reduce-scatter the input
            # gradient, the row layers gather the output gradient. The replicated tensors used on the local tokens
            # (the modulation b x 6d, two LayerNorms' weight and bias) get their gradients all-reduced.
            shared = 2 * _share(t) * (b * 6 * d + 4 * d) * e
            out["tp"] = {"forward": 6 * _share(t) * act,
                         "backward": 9 * _share(t) * act + 2 * _share(t) * text + qk_norms + shared}
        else:
            # Forward: the 3 row layers all-reduce their output. Backward: the 4 column layers all-reduce their
            # input gradient (attn2.proj_kv's input is the text).
            out["tp"] = {"forward": 3 * 2 * _share(t) * act,
                         "backward": 2 * _share(t) * (3 * act + text) + qk_norms}
    if u > 1:
        # q, k, v and the output: each (b, s/c, d/t) exchanged by all-to-all, in both passes.
        a2a = 4 * _share(u) * act / t
        mask = (u - 1) * b * (s // c) if masked else 0  # the key mask, all-gathered (1 byte per key)
        out["ulysses"] = {"forward": a2a + mask, "backward": a2a}
    if r > 1:
        # K and V blocks of (b, s u/c, d/(t u)) = act / t pass around the ring; the backward passes them again
        # with float32 dK/dV accumulators.
        kv = 2 * (r - 1) * act / t
        mask = (r - 1) * b * (s * u // c) if masked else 0
        out["ring"] = {"forward": kv + mask, "backward": kv + mask + kv * 4 / e}
    return out


# --- counting the real collectives ------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_size(group) -> int:
    return dist.get_world_size(group)


@dataclass
class CommunicationCounter:
    """Adds up the bytes each collective call of this rank sends (the module docstring's volumes), by `phase`.

        with CommunicationCounter() as counter:
            counter.phase = "forward"; out = model(...)
            counter.phase = "backward"; out.backward(g)
        counter.sent["forward"], counter.calls["backward"]
    """

    phase: str = "forward"
    sent: Dict[str, float] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)

    def add(self, nbytes: float) -> None:
        self.sent[self.phase] = self.sent.get(self.phase, 0.0) + nbytes
        self.calls[self.phase] = self.calls.get(self.phase, 0) + 1

    def _wrappers(self):
        def all_reduce(fn):
            def wrapped(tensor, *args, group=None, **kwargs):
                p = _group_size(group)
                self.add(2 * _share(p) * _bytes(tensor))
                return fn(tensor, *args, group=group, **kwargs)
            return wrapped

        def gather_into(fn):  # (output, input): output holds P inputs
            def wrapped(output, input, *args, group=None, **kwargs):
                self.add(_share(_group_size(group)) * _bytes(output))
                return fn(output, input, *args, group=group, **kwargs)
            return wrapped

        def scatter_from(fn):  # (output, input): input holds P outputs
            def wrapped(output, input, *args, group=None, **kwargs):
                self.add(_share(_group_size(group)) * _bytes(input))
                return fn(output, input, *args, group=group, **kwargs)
            return wrapped

        def gather_list(fn):  # all_gather(list of P outputs, input)
            def wrapped(outputs, input, *args, group=None, **kwargs):
                self.add((_group_size(group) - 1) * _bytes(input))
                return fn(outputs, input, *args, group=group, **kwargs)
            return wrapped

        def all_to_all(fn):  # all_to_all_single(output, input)
            def wrapped(output, input, *args, group=None, **kwargs):
                self.add(_share(_group_size(group)) * _bytes(input))
                return fn(output, input, *args, group=group, **kwargs)
            return wrapped

        def p2p_batch(fn):  # isend/irecv are left alone: P2POp compares its op with them by identity
            def wrapped(ops, *args, **kwargs):
                for op in ops:
                    if getattr(op.op, "__name__", "") in ("isend", "send"):
                        self.add(_bytes(op.tensor))
                return fn(ops, *args, **kwargs)
            return wrapped

        def send(fn):
            def wrapped(tensor, *args, **kwargs):
                self.add(_bytes(tensor))
                return fn(tensor, *args, **kwargs)
            return wrapped

        return {"all_reduce": all_reduce, "all_gather_into_tensor": gather_into, "_all_gather_base": gather_into,
                "reduce_scatter_tensor": scatter_from, "_reduce_scatter_base": scatter_from,
                "all_gather": gather_list, "all_to_all_single": all_to_all, "batch_isend_irecv": p2p_batch,
                "send": send}

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        from megatron.core.tensor_parallel import layers, mappings

        wrappers = self._wrappers()
        saved = []
        for name, wrap in wrappers.items():
            if hasattr(dist, name):
                saved.append((dist, name, getattr(dist, name)))
        # Megatron-core binds its all-gather and reduce-scatter functions at import.
        for module in (mappings, layers):
            for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
        originals = {id(fn): fn for _, _, fn in saved}
        kinds = {}
        for owner, name, fn in saved:
            kind = name if owner is dist else ("_all_gather_base" if "gather" in name else "_reduce_scatter_base")
            kinds[(owner, name)] = wrappers[kind](originals[id(fn)])
        try:
            for (owner, name), fn in kinds.items():
                setattr(owner, name, fn)
            yield
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)

    def __enter__(self) -> "CommunicationCounter":
        self._context = self._patched()
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
