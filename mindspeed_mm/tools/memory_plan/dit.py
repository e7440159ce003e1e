"""The StepVideo DiT's parameters and activations per rank, as arithmetic (no torch).

Everything here mirrors `mindspeed_mm/models/predictor/stepvideo/{model,layers,parallelize}.py`. When that code
changes what it creates or what autograd keeps, this file must follow; `tests/test_memory_plan.py` checks the parameter
count against the real module and the saved-activation count against autograd's saved tensors at a small size.

Notation (all per rank): a = activation bytes per element (2 for bf16), s = micro-batch x padded tokens / CP (this
rank's tokens at the attention and the FFN), s' = s / TP with sequence parallel, else s (the rank's tokens outside
the tensor-parallel matmuls), D = hidden size, Dl = D / TP (this rank's heads x head_dim), Fl = 4D / TP (this rank's
FFN width), Hl = heads / TP, T = text keys (CLIP 77 + step_llm 320 at most), u = the Ulysses degree, r = CP / u the
ring size. The tokens of a sample are padded up to a multiple of CP (x TP with sequence parallel); see `TokenSplit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# Width of the sinusoidal timestep (and motion score) embedding fed to the timestep MLPs.
TIMESTEP_CHANNELS = 256
# What the final norm and projection keep (outside_block_activations' key).
FINAL_LAYER = "final norm and projection"
# Bytes of the float32 copies the q/k RMSNorms make of their input (they normalise in float32).
FP32 = 4
# Ring attention's blockwise math path: queries are taken this many at a time against each received key block.
RING_QUERY_CHUNK = 2048


@dataclass(frozen=True)
class DiTShape:
    """The DiT's architecture, as the predictor section of the model JSON gives it."""

    num_layers: int = 48
    num_heads: int = 48
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    patch_size: int = 1
    caption_channels: Tuple[int, int] = (6144, 1024)
    i2v: bool = False  # use_additional_conditions: 2x input channels and the motion-score MLP
    norm_elementwise_affine: bool = False  # caption_norm and norm_out
    attention_norm_elementwise_affine: bool = True  # q/k RMSNorm weights

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_config(cls, predictor) -> "DiTShape":
        """From a `PredictorConfig` (or anything with its attribute names)."""
        return cls(num_layers=predictor.num_layers, num_heads=predictor.num_heads, head_dim=predictor.head_dim,
                   in_channels=predictor.in_channels, out_channels=predictor.out_channels,
                   patch_size=predictor.patch_size, caption_channels=tuple(predictor.caption_channels),
                   i2v=bool(predictor.use_additional_conditions),
                   norm_elementwise_affine=bool(predictor.norm_elementwise_affine),
                   attention_norm_elementwise_affine=bool(predictor.attention_norm_elementwise_affine))


@dataclass(frozen=True)
class ParameterCount:
    """Parameters split over tensor parallel (each rank holds 1/TP) and replicated on every TP rank."""

    tp_split: int
    replicated: int
    largest_tp_split: int  # the largest single split tensor, unsplit (its gradient is a transient in backward)

    @property
    def total(self) -> int:
        return self.tp_split + self.replicated

    def per_rank(self, tp: int) -> int:
        return self.tp_split // tp + self.replicated


def block_parameters(shape: DiTShape) -> ParameterCount:
    d, hd = shape.hidden, shape.head_dim
    # Column/row parallel: attn1 qkv (3D^2) and out (D^2); attn2 q (D^2), kv (2D^2), out (D^2); FFN 4D^2 + 4D^2.
    split = 16 * d * d
    qk_norms = 4 * hd if shape.attention_norm_elementwise_affine else 0
    # norm1 and norm2 (weight + bias), the block's (6, D) scale-shift table, the q/k RMSNorm weights.
    replicated = 2 * 2 * d + 6 * d + qk_norms
    return ParameterCount(split, replicated, largest_tp_split=4 * d * d)


def dit_parameters(shape: DiTShape) -> ParameterCount:
    """Parameters of `StepVideoDiT` (checked against `sum(p.numel())` of the real module in the tests)."""
    d, p = shape.hidden, shape.patch_size
    llm_channels, clip_channels = shape.caption_channels
    c_in = shape.in_channels * (2 if shape.i2v else 1)
    mlp = TIMESTEP_CHANNELS * d + d + d * d + d  # linear_1 (256 -> D) and linear_2 (D -> D), with biases
    replicated = (
        d * c_in * p * p + d  # pos_embed: Conv2d(c_in -> D, kernel p)
        + mlp * (2 if shape.i2v else 1)  # timestep MLP, plus the motion-score MLP for i2v
        + clip_channels * d + d  # clip_projection
        + (2 * llm_channels if shape.norm_elementwise_affine else 0)  # caption_norm
        + llm_channels * d + d + d * d + d  # caption_projection (two linears)
        + (2 * d if shape.norm_elementwise_affine else 0)  # norm_out
        + 2 * d  # final scale-shift table
        + d * p * p * shape.out_channels + p * p * shape.out_channels  # proj_out
    )
    adaln_split = 6 * d * d + 6 * d  # adaln_single.linear: column parallel, weight and bias split
    block = block_parameters(shape)
    return ParameterCount(tp_split=adaln_split + shape.num_layers * block.tp_split,
                          replicated=replicated + shape.num_layers * block.replicated,
                          largest_tp_split=max(6 * d * d, block.largest_tp_split))


# --- activations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One micro-batch as the DiT sees it on one rank."""

    batch: int  # samples in the DiT's batch (DPO's actor runs winner and loser together: 2 x micro-batch)
    latent_frames: int
    latent_height: int
    latent_width: int
    llm_tokens: int = 320  # step_llm tokens (its tokenizer's model_max_length)
    clip_tokens: int = 77  # CLIP tokens, all attended

    @property
    def text_tokens(self) -> int:
        """Cross-attention keys at most: every CLIP token and the longest valid step_llm prompt."""
        return self.llm_tokens + self.clip_tokens

    def tokens(self, patch_size: int) -> int:
        """Video tokens of one sample: latent frames x (h / p) x (w / p)."""
        return self.latent_frames * (self.latent_height // patch_size) * (self.latent_width // patch_size)


@dataclass(frozen=True)
class TokenSplit:
    """How a sample's tokens are split over the ranks of one TP x CP group.

    The s = f x h x w tokens of a sample (after patchify) are padded with masked tokens up to a multiple of CP (x TP
    with sequence parallel) and split evenly: each rank holds `rank_tokens` of them at the attention and the FFN
    (heads and features split by TP), and `stream_tokens` outside the tensor-parallel matmuls (the residual stream:
    s / (CP x TP) with sequence parallel). Inside the self-attention core, Ulysses' all-to-all over `ulysses` ranks
    trades tokens for heads (`core_tokens` x `core_heads`), and a ring of CP / ulysses ranks passes the keys and
    values around (ring attention)."""

    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False  # Megatron's; no effect at TP 1
    ulysses: Optional[int] = None  # the Ulysses degree; None: all of CP (ulysses_cp_algo)

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def ulysses_degree(self) -> int:
        return self.cp if self.ulysses is None else self.ulysses

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses_degree

    def padded_tokens(self, tokens: int) -> int:
        """A sample's tokens, padded up to a multiple of CP (x TP with sequence parallel)."""
        multiple = self.cp * (self.tp if self.sp else 1)
        return -(-tokens // multiple) * multiple

    def rank_tokens(self, tokens: int) -> int:
        """Tokens of one sample on this rank at the attention and the FFN (padding included)."""
        return self.padded_tokens(tokens) // self.cp

    def stream_tokens(self, tokens: int) -> int:
        """Tokens of one sample on this rank outside the tensor-parallel matmuls (padding included)."""
        return self.padded_tokens(tokens) // (self.cp * (self.tp if self.sp else 1))

    def core_tokens(self, tokens: int) -> int:
        """Query tokens of one sample in the self-attention core, after Ulysses' all-to-all."""
        return self.rank_tokens(tokens) * self.ulysses_degree

    def core_heads(self, num_heads: int) -> int:
        return num_heads // (self.tp * self.ulysses_degree)


@dataclass(frozen=True)
class BlockActivations:
    """What one transformer block keeps for its backward on one rank, in bytes."""

    residual: int  # the nine (s', D) tensors: input, norms, modulated inputs, branch outputs
    self_attention: int
    cross_attention: int
    feed_forward: int
    checkpoint_input: int  # what a recomputed block keeps instead: its input
    # Not kept: ring attention's K/V receive buffers and its float32 score block while the core runs (forward and
    # backward); 0 without a ring.
    attention_transient: int = 0

    @property
    def total(self) -> int:
        return self.residual + self.self_attention + self.cross_attention + self.feed_forward


def _rmsnorm_copy(a: int) -> int:
    # The q/k RMSNorm normalises in float32: below fp32 it keeps a float32 copy of its input for backward; in fp32
    # the "copy" is its input itself (already kept by someone else).
    return 0 if a >= FP32 else FP32


def ring_attention_transient_bytes(shape: DiTShape, workload: Workload, split: TokenSplit, a: int) -> int:
    """Ring attention's memory in flight while the core runs, beyond what it keeps: two receive buffers (double
    buffering) of K and V, 4a s Dl, and the blockwise math path's float32 score block of one step,
    [b, core heads, min(core tokens, 2048), core tokens] (queries chunked by 2048 against a received key block of
    core-tokens keys). 0 without a ring (r = 1)."""
    if split.ring <= 1:
        return 0
    tokens = workload.tokens(shape.patch_size)
    core, heads = split.core_tokens(tokens), split.core_heads(shape.num_heads)
    b = workload.batch
    kv_buffers = 2 * 2 * a * b * core * heads * shape.head_dim
    scores = FP32 * b * heads * min(core, RING_QUERY_CHUNK) * core
    return kv_buffers + scores


def block_activations(shape: DiTShape, workload: Workload, tp: int, cp: int, a: int, *,
                      sequence_parallel: bool = False, ulysses: Optional[int] = None) -> BlockActivations:
    """Bytes one block saves for backward (autograd's saved tensors), per rank; `ulysses` is the Ulysses degree u
    (None: all of CP), the ring size is CP / u.

    Self-attention without Ulysses (u = 1: CP 1, or ring attention): the fused qkv output (3a, kept alive by the v
    view the attention saves), two float32 RMSNorm copies, q/k norm outputs (2a), q/k after RoPE (2a), the attention
    output (a, which is also proj_out's input): (3a + 2c + 5a) s Dl, with c the RMSNorm copy. With Ulysses (u > 1)
    the attention keeps the exchanged q, k, v instead of the local ones (the qkv output is then freed) and proj_out
    keeps the exchanged-back output: (2c + 2a + 3a + a + a) s Dl (+3a s Dl in fp32, where the RMSNorm "copy" is the
    qkv output). The exchanged tensors hold s x u tokens x Hl / u heads: the same bytes. A ring keeps the same
    tensors (its local q, k, v and out) and a float32 log-sum-exp [b, Hl / u, s x u] like flash attention's; what it
    has in flight is `attention_transient` (`ring_attention_transient_bytes`).
    Cross-attention: the RMSNorm copy of q (or the q projection in fp32), q norm output, normed q, attention output:
    (4 + 3a) s Dl; the key side (kv projection, its RMSNorm copy, k norm output, normed k) is text sized; the
    boolean key mask becomes an additive (s, T) mask in the activation dtype.
    FFN: the GELU input and output (2a s Fl).
    Residual stream: x, norm1(x), the modulated attn1 input, the attn1 output, x after attn1, x after attn2,
    norm2(x), the modulated FFN input and the FFN output: 9a s' D. With sequence parallel these are the rank's
    s / TP tokens: the column-parallel linears (attn1.proj_qkv, attn2.proj_q, ff.net.0.proj) keep their local input
    and all-gather it again in backward, and the row-parallel outputs are reduce-scattered.
    Small terms: float32 log-sum-exp per head and token of both attentions, float32 RMSNorm inverse-RMS per head and
    token, LayerNorm mean/rstd (s' tokens), the (b, 6D) modulation.
    """
    split = TokenSplit(tp, cp, sequence_parallel, ulysses)
    d = shape.hidden
    b, t = workload.batch, workload.text_tokens
    tokens = workload.tokens(shape.patch_size)
    s = b * split.rank_tokens(tokens)
    s_stream = b * split.stream_tokens(tokens)
    dl, fl, hl = d // tp, 4 * d // tp, shape.num_heads // tp
    c = _rmsnorm_copy(a)
    if split.ulysses_degree == 1:
        self_attn = (3 * a + 2 * c + 5 * a) * s * dl
    else:
        qkv_kept = 3 * a if c == 0 else 0
        self_attn = (qkv_kept + 2 * c + 7 * a) * s * dl
    # log-sum-exp [b, Hl / u, s x u] of the core (float32); q and k inverse RMS (before the exchange).
    lse = FP32 * b * split.core_heads(shape.num_heads) * split.core_tokens(tokens)
    self_attn += lse + FP32 * s * hl * 2
    cross_attn = (FP32 + 3 * a) * s * dl + FP32 * s * hl * (1 + 1)
    cross_attn += (4 * a + c) * b * t * dl + FP32 * b * t * hl  # key side: kv, RMSNorm copy, k norm out, normed k
    cross_attn += a * s * t  # additive key mask
    # LayerNorm mean and rstd (float32) of norm1 and norm2; the block's (b, 6D) modulation and 1 + scale twice.
    residual = 9 * a * s_stream * d + 2 * 2 * FP32 * s_stream + a * b * 8 * d
    feed_forward = 2 * a * s * fl
    return BlockActivations(residual=residual, self_attention=self_attn, cross_attention=cross_attn,
                            feed_forward=feed_forward, checkpoint_input=a * s_stream * d,
                            attention_transient=ring_attention_transient_bytes(shape, workload, split, a))


def outside_block_activations(shape: DiTShape, workload: Workload, cp: int, a: int, *, tp: int = 1,
                              sequence_parallel: bool = False) -> Dict[str, int]:
    """Bytes kept outside the blocks, per rank: the patch embedding's input, the text projections, the tensors
    every block shares (RoPE tables, text states, modulation), the final norm and projection (on the s' tokens of
    the residual stream), and the latents and loss buffers (every CP rank holds the full latents and computes the
    loss on the gathered output)."""
    split = TokenSplit(tp, cp, sequence_parallel)
    d, p = shape.hidden, shape.patch_size
    b, t = workload.batch, workload.text_tokens
    tokens = workload.tokens(p)
    s = b * split.rank_tokens(tokens)
    s_stream = b * split.stream_tokens(tokens)
    llm_channels, clip_channels = shape.caption_channels
    c_in = shape.in_channels * (2 if shape.i2v else 1)
    latent_elems = b * workload.latent_frames * shape.out_channels * workload.latent_height * workload.latent_width
    out = {
        "patch embedding input": a * s * c_in * p * p,
        "text projections": a * b * (workload.llm_tokens * (llm_channels + 2 * d)
                                     + workload.clip_tokens * clip_channels),
        "shared by the blocks (RoPE, text, modulation)": 2 * a * split.rank_tokens(tokens) * shape.head_dim
        + a * b * t * d + a * b * 8 * d,
        FINAL_LAYER: 3 * a * s_stream * d,
        # x0, noise, x_t, target, prediction and squared error in float32; the DiT's own copies in its dtype.
        "latents and loss": latent_elems * (6 * FP32 + 2 * a) + (latent_elems * (FP32 + 3 * a) if shape.i2v else 0),
    }
    return out


# --- recompute ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recompute:
    """Megatron's full recompute: method "block" (the first `num_layers` blocks each checkpointed) or "uniform"
    (groups of `num_layers` blocks checkpointed together); method None: no recompute."""

    method: Optional[str] = None
    num_layers: int = 0

    def units(self, total_layers: int) -> List[Tuple[int, bool]]:
        """The blocks in forward order as (blocks in the unit, checkpointed)."""
        if self.method is None or self.num_layers <= 0:
            return [(1, False)] * total_layers
        n = min(self.num_layers, total_layers)
        if self.method == "uniform":
            return [(min(n, total_layers - start), True) for start in range(0, total_layers, n)]
        if self.method == "block":
            return [(1, True)] * n + [(1, False)] * (total_layers - n)
        raise ValueError(f"recompute method {self.method!r} is not block or uniform")

    def recomputed_layers(self, total_layers: int) -> int:
        return sum(n for n, checkpointed in self.units(total_layers) if checkpointed)

    def describe(self, total_layers: int) -> str:
        if self.method is None or self.num_layers <= 0:
            return "none"
        n = min(self.num_layers, total_layers)
        if self.method == "block":
            return f"block, {n} of {total_layers} blocks"
        return f"uniform, groups of {n}"


@dataclass(frozen=True)
class ActivationPeak:
    block: BlockActivations
    outside: Dict[str, int]
    saved_by_blocks: int  # what all blocks keep after the forward
    recompute_working: int  # the recomputed unit's activations while its backward runs (beyond its input)
    backward_working: int  # gradients in flight in a block's backward, plus one weight gradient
    peak: int


def backward_working_bytes(shape: DiTShape, workload: Workload, tp: int, cp: int, a: int, param_bytes: int, *,
                           sequence_parallel: bool = False, ulysses: Optional[int] = None) -> int:
    """Gradients and buffers alive beyond the saved tensors at the worst point of a block's backward.

    The FFN's: the incoming gradient and the FFN output's gradient (2a s' D), with sequence parallel one
    all-gathered (s, D) tensor at a time (the FFN output's gradient gathered for ff.net.2, then ff.net.0.proj's
    input gathered again for its weight gradient: a s D), the FFN hidden gradient (a s Fl: the GELU's input gradient
    replaces its output's, whose saved tensor is freed), and one weight gradient (the FFN weight, until Megatron's
    hook adds it into the main-grad buffer and frees it).
    The self-attention's, with a ring: 2a s' D, the core output's gradient (a s Dl) and the ring's buffers and score
    block (`ring_attention_transient_bytes`). The larger of the two."""
    split = TokenSplit(tp, cp, sequence_parallel, ulysses)
    d = shape.hidden
    tokens = workload.tokens(shape.patch_size)
    s = workload.batch * split.rank_tokens(tokens)
    s_stream = workload.batch * split.stream_tokens(tokens)
    gathered = a * s * d if split.sp else 0
    ffn = (2 * a * s_stream * d + gathered + a * s * (4 * d // tp)
           + param_bytes * block_parameters(shape).largest_tp_split // tp)
    ring = ring_attention_transient_bytes(shape, workload, split, a)
    attention = 2 * a * s_stream * d + a * s * (d // tp) + ring if ring else 0
    return max(ffn, attention)


def activation_peak(shape: DiTShape, workload: Workload, tp: int, cp: int, recompute: Recompute, a: int,
                    param_bytes: int, *, sequence_parallel: bool = False,
                    ulysses: Optional[int] = None) -> ActivationPeak:
    """The activation peak of forward + backward on one rank.

    The backward runs the units (blocks, or checkpointed groups) in reverse. While unit k runs its backward, the
    units before it still hold what they saved (a checkpointed unit: its input, a s' D; a plain block: everything),
    unit k holds all its blocks' activations (recomputed if checkpointed), and the backward's own gradients are in
    flight:

        peak = max(outside + sum_j saved_j,                                         (end of the forward)
                   outside - final + max_k [ sum_{j<k} saved_j + n_k x block + backward_working ])

    where `final` is what the final norm and projection keep: their backward runs, and frees it, before the
    blocks' backward starts. What a block has in flight during its forward (sequence parallel's gathered input, the
    ring's buffers and scores) is within the same bound: the backward working set counts it, on top of the whole
    block.
    """
    kw = dict(sequence_parallel=sequence_parallel, ulysses=ulysses)
    block = block_activations(shape, workload, tp, cp, a, **kw)
    outside = outside_block_activations(shape, workload, cp, a, tp=tp, sequence_parallel=sequence_parallel)
    units = recompute.units(shape.num_layers)
    saved = [block.checkpoint_input if checkpointed else n * block.total for n, checkpointed in units]
    working = backward_working_bytes(shape, workload, tp, cp, a, param_bytes, **kw)
    outside_total = sum(outside.values())
    worst, before = 0, 0
    for (n, _), kept in zip(units, saved):
        worst = max(worst, before + n * block.total)
        before += kept
    largest_recomputed = max((n for n, checkpointed in units if checkpointed), default=0)
    recompute_working = largest_recomputed * block.total - block.checkpoint_input if largest_recomputed else 0
    end_of_forward = outside_total + sum(saved)
    in_backward = outside_total - outside[FINAL_LAYER] + worst + working
    return ActivationPeak(block=block, outside=outside, saved_by_blocks=sum(saved),
                          recompute_working=max(recompute_working, 0), backward_working=working,
                          peak=max(end_of_forward, in_backward))


def forward_working_bytes(shape: DiTShape, workload: Workload, tp: int, cp: int, a: int, *,
                          sequence_parallel: bool = False, ulysses: Optional[int] = None) -> int:
    """Memory of one block's forward without autograd (DPO's frozen reference): with the residual stream alive
    (3a s' D), the larger of the FFN (its gathered input with sequence parallel, a s D, and its hidden before and
    after the GELU, 2a s Fl) and the ring attention's buffers and score block."""
    split = TokenSplit(tp, cp, sequence_parallel, ulysses)
    d = shape.hidden
    tokens = workload.tokens(shape.patch_size)
    s = workload.batch * split.rank_tokens(tokens)
    s_stream = workload.batch * split.stream_tokens(tokens)
    ffn = (a * s * d if split.sp else 0) + 2 * a * s * (4 * d // tp)
    return 3 * a * s_stream * d + max(ffn, ring_attention_transient_bytes(shape, workload, split, a))


# --- sampling (inference): a forward without autograd --------------------------------------


@dataclass(frozen=True)
class SamplingForward:
    """The DiT's forward without autograd on one rank while sampling, in bytes: nothing is kept for a backward, so
    the peak is the largest moment of one block (or of the patch embedding) on top of what every block shares."""

    shared: int  # RoPE tables, text states and modulation, alive through all blocks
    patch_embedding: int  # the whole sequence's tokens before the CP / SP split (no block runs yet)
    self_attention: int  # residual stream + the block's worst self-attention moment
    feed_forward: int  # residual stream + the FFN's hidden before and after the GELU

    @property
    def block(self) -> int:
        return max(self.self_attention, self.feed_forward)

    @property
    def peak(self) -> int:
        return max(self.patch_embedding, self.shared + self.block)


def sampling_forward(shape: DiTShape, workload: Workload, tp: int, cp: int, a: int, *,
                     sequence_parallel: bool = False, ulysses: Optional[int] = None) -> SamplingForward:
    """The moments of `StepVideoDiT.forward` under `torch.no_grad()` (layers.py, model.py), per rank, with s, s', Dl
    and Fl as in the module docstring (s counts the DiT's whole batch: 2 x videos with classifier-free guidance).

    Each block moment holds the residual stream x and the modulated input h (2a s' D; with sequence parallel the
    column-parallel linear's all-gathered input, a s D, too), then the largest of:
      - the k RMSNorm: the qkv output (3a s Dl), the normed q (a), k's float32 copy (c) and float32 result (4) and
        its cast (a; none in fp32): nothing autograd frees early, the locals live until the forward returns;
      - the attention core: qkv (v is a view of it) and q, k after RoPE (5a + a: 6a s Dl), with Ulysses (u > 1) also
        the exchanged q, k, v and output (4a s Dl), with a ring its K/V buffers and score block in flight;
      - the output projection: the same 6a s Dl plus its (s, D) result before the TP all-reduce / reduce-scatter;
      - the FFN: its hidden before and after the GELU (2a s Fl).
    Cross-attention's moments (q and its output, 2a s Dl, and the text-sized key side) are below the
    self-attention's and not counted. The patch embedding runs on every rank over the whole sequence: the conv's
    output and its token-major copy (2a b S D; with padding the padded copy replaces one), before the split.
    """
    split = TokenSplit(tp, cp, sequence_parallel, ulysses)
    d = shape.hidden
    tokens = workload.tokens(shape.patch_size)
    b = workload.batch
    s, s_stream = b * split.rank_tokens(tokens), b * split.stream_tokens(tokens)
    dl, fl = d // tp, 4 * d // tp
    c = _rmsnorm_copy(a)
    stream = 2 * a * s_stream * d + (a * s * d if split.sp else 0)
    cast = a if a < FP32 else 0
    rmsnorm = (4 * a + c + FP32 + cast) * s * dl
    exchanged = 4 * a * s * dl if split.ulysses_degree > 1 else 0
    core = 6 * a * s * dl + exchanged + ring_attention_transient_bytes(shape, workload, split, a)
    projection = 6 * a * s * dl + a * s * d
    outside = outside_block_activations(shape, workload, cp, a, tp=tp, sequence_parallel=sequence_parallel)
    shared = outside["shared by the blocks (RoPE, text, modulation)"]
    c_in = shape.in_channels * (2 if shape.i2v else 1)
    padded = split.padded_tokens(tokens)
    patch = a * b * (c_in * tokens + d * (tokens + padded))
    return SamplingForward(shared=shared, patch_embedding=patch,
                           self_attention=stream + max(rmsnorm, core, projection),
                           feed_forward=stream + 2 * a * s * fl)
