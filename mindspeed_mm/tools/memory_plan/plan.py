"""Peak device memory per rank of a StepVideo training step, and the layouts that fit (arithmetic, no torch).

    peak = persistent + max(activation peak, optimizer step, encoders, DPO reference forward)

Persistent, per rank, with P = the rank's DiT parameters (`dit.dit_parameters(...).per_rank(TP)`) and
N = DP x CP when the distributed optimizer shards the optimizer (Megatron shards it over the data x context parallel
group), else 1:

    parameters          P x 2 (bf16/fp16) or P x 4 (fp32)
    gradient buffer     P x 4           (Megatron DDP with grad_reduce_in_fp32, as training/train.py builds it)
    master weights      P x 4 / N       (bf16/fp16 only: the optimizer's float32 copy)
    Adam states         P x 8 / N       (exp_avg and exp_avg_sq in float32; SGD: P x 4 / N)
    DPO reference       P x 2           (a frozen second DiT, same TP split, no gradients or optimizer)
    encoders            their parameters (raw-video training: load_video_features / load_text_features false)

The transient phases do not overlap: the encoders run before the DiT's forward, the optimizer after its backward.
With `enable_encoder_dp` (raw-video training) the iteration's encoded features are held on every rank for the whole
step (`MemoryPlan.held`, added to the peak) and its pixels on the host before encoding (`MemoryPlan.host`).

How the tokens are split (sequence parallel, the context-parallel algorithm and its Ulysses degree) is the layout's
`split` (`dit.TokenSplit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from .dit import (FP32, ActivationPeak, DiTShape, Recompute, SamplingForward, TokenSplit, Workload, activation_peak,
                  block_parameters, dit_parameters, forward_working_bytes, sampling_forward)
from .encoders import BertShape, StepLLMShape, VAEShape, vae_decode_working_bytes, vae_encode_working_bytes

GIB = 2**30


# --context-parallel-algo's values, as mindspeed_mm/parallel/options.py has them (not imported: the parallel package
# imports torch, and the planner is arithmetic).
CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")
_ALGO_NAMES = {"ulysses_cp_algo": "Ulysses", "megatron_cp_algo": "ring", "hybrid_cp_algo": "hybrid"}


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    recompute: Recompute = Recompute()
    distributed_optimizer: bool = False
    sequence_parallel: bool = False  # --sequence-parallel (no effect at TP 1)
    cp_algo: str = "ulysses_cp_algo"  # --context-parallel-algo
    ulysses_degree: Optional[int] = None  # --ulysses-degree-in-cp (hybrid_cp_algo only)

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp

    @property
    def optimizer_shards(self) -> int:
        return self.dp * self.cp if self.distributed_optimizer else 1

    @property
    def sp(self) -> bool:
        """Sequence parallel in effect (it needs TP > 1)."""
        return self.sequence_parallel and self.tp > 1

    @property
    def ulysses(self) -> int:
        """The Ulysses degree u: all of CP (ulysses_cp_algo), 1 (megatron_cp_algo, ring), --ulysses-degree-in-cp
        (hybrid_cp_algo); as `SequenceParallelOptions.ulysses_size`."""
        if self.cp_algo == "ulysses_cp_algo":
            return self.cp
        if self.cp_algo == "megatron_cp_algo":
            return 1
        return self.ulysses_degree or 1

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def split(self) -> TokenSplit:
        return TokenSplit(self.tp, self.cp, self.sp, self.ulysses)

    def flags(self) -> str:
        """Short: `TP8 CP8 hybrid u2 +SP`."""
        out = f"TP{self.tp} CP{self.cp}"
        if self.cp > 1:
            out += {"ulysses_cp_algo": " ulysses", "megatron_cp_algo": " ring"}.get(self.cp_algo,
                                                                                    f" hybrid u{self.ulysses}")
        return out + (" +SP" if self.sp else "")

    def launcher_flags(self) -> str:
        """The launcher's flags for this layout's parallelism."""
        out = [f"--tensor-model-parallel-size {self.tp}", f"--context-parallel-size {self.cp}"]
        if self.cp > 1:
            out.append(f"--context-parallel-algo {self.cp_algo}")
            if self.cp_algo == "hybrid_cp_algo":
                out.append(f"--ulysses-degree-in-cp {self.ulysses}")
        if self.sp:
            out.append("--sequence-parallel")
        if self.distributed_optimizer:
            out.append("--use-distributed-optimizer")
        return " ".join(out)

    def describe(self, num_layers: int) -> str:
        cp = f"CP {self.cp}"
        if self.cp > 1:
            algo = _ALGO_NAMES.get(self.cp_algo, self.cp_algo)
            cp += (f" ({algo}: Ulysses {self.ulysses} x ring {self.ring})" if self.cp_algo == "hybrid_cp_algo"
                   else f" ({algo})")
        return (f"TP {self.tp} x {cp} x DP {self.dp}, {'sequence parallel, ' if self.sp else ''}"
                f"recompute {self.recompute.describe(num_layers)}, "
                f"{'distributed' if self.distributed_optimizer else 'plain'} optimizer")


@dataclass(frozen=True)
class Training:
    """What the training entry point builds around the DiT."""

    dtype_bytes: int = 2  # parameters and activations: 2 with --bf16/--fp16, else 4
    dpo: bool = False  # DPO: a frozen reference DiT, and winner + loser in one actor batch
    optimizer: str = "adam"
    # "accelerator" (NCCL/HCCL): torch's Adam updates all tensors of a group at once (foreach), with a float32
    # temporary as large as the group, and the gradient reduce-scatter works in place. "cpu" (gloo, for the
    # validation on CPU): Adam goes tensor by tensor, and gloo's reduce-scatter works on a full copy of the buffer.
    backend: str = "accelerator"


@dataclass(frozen=True)
class RawVideo:
    """The frozen encoders of raw-video training, and the pixel batch they encode."""

    vae: Optional[VAEShape] = None  # None: the data hold latents (load_video_features true)
    vae_parameters: int = 0
    vae_bytes: int = 2
    vae_tile: Optional[int] = None  # ae.tile_sample_size when ae.use_tiling
    num_frames: int = 0
    height: int = 0
    width: int = 0
    step_llm: Optional[StepLLMShape] = None  # None: the data hold text states (load_text_features true)
    step_llm_bytes: int = 2
    text_encoder_layerwise_offload: bool = False  # Step-LLM's layers in host memory, two on the device
    clip: Optional[BertShape] = None
    clip_bytes: int = 4
    # enable_encoder_dp (TP x CP > 1): each micro-batch of the iteration is encoded by one rank of its TP x CP group
    # and shared (DiffusionLossModel.encode_iteration), so the iteration's features are held on every rank:
    # num_micro_batches x micro-batch samples, num_micro_batches = global batch / (micro-batch x DP).
    encoder_dp: bool = False
    global_batch: Optional[int] = None  # --global-batch-size; None: micro-batch x DP (one micro-batch)

    def num_micro_batches(self, micro_batch: int, dp: int) -> int:
        return max(1, (self.global_batch or 0) // (micro_batch * dp))


@dataclass
class MemoryPlan:
    """The per-rank estimate of one layout, in bytes; `problems` instead of numbers when the layout cannot run."""

    layout: Layout
    shape: DiTShape
    workload: Workload  # the DiT's batch: DPO runs 2 x micro-batch samples
    problems: List[str] = field(default_factory=list)
    parameters_total: int = 0
    parameters_rank: int = 0
    persistent: Dict[str, int] = field(default_factory=dict)
    activations: Optional[ActivationPeak] = None
    activations_without_recompute: Optional[ActivationPeak] = None
    activations_full_recompute: Optional[ActivationPeak] = None
    phases: Dict[str, int] = field(default_factory=dict)  # transient memory of each phase of the step
    held: Dict[str, int] = field(default_factory=dict)  # device memory held through the step (encoder DP's features)
    host: Dict[str, int] = field(default_factory=dict)  # host memory of note (encoder DP's pixels), not in the peak

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def persistent_total(self) -> int:
        return sum(self.persistent.values())

    @property
    def held_total(self) -> int:
        return sum(self.held.values())

    @property
    def peak_phase(self) -> Optional[str]:
        return max(self.phases, key=self.phases.get) if self.valid else None

    @property
    def peak(self) -> Optional[int]:
        """Persistent memory, what is held through the step, and the largest transient phase; None for a layout that
        cannot run."""
        return self.persistent_total + self.held_total + max(self.phases.values()) if self.valid else None


def layout_problems(shape: DiTShape, workload: Workload, layout: Layout) -> List[str]:
    """Why a layout cannot run this model and video (the checks the DiT and the launcher make). The tokens are padded
    to a multiple of CP (x TP with sequence parallel), so no size has to divide; Ulysses splits each TP rank's heads
    over its degree u, so num_heads must be divisible by TP x u (a ring does not split heads)."""
    problems = []
    if layout.cp_algo not in CP_ALGOS:
        problems.append(f"context-parallel algorithm {layout.cp_algo!r} is not one of {', '.join(CP_ALGOS)}")
        return problems
    u = layout.ulysses
    if layout.cp_algo == "hybrid_cp_algo" and (u < 1 or layout.cp % u):
        problems.append(f"the Ulysses degree {u} does not divide CP {layout.cp} (hybrid: CP = Ulysses x ring)")
    elif shape.num_heads % (layout.tp * u):
        problems.append(f"num_heads {shape.num_heads} is not divisible by TP {layout.tp} x Ulysses degree {u} = "
                        f"{layout.tp * u} (ring attention, megatron_cp_algo or hybrid_cp_algo, does not split heads)")
    if workload.latent_height % shape.patch_size or workload.latent_width % shape.patch_size:
        problems.append(f"the latent size {workload.latent_height}x{workload.latent_width} is not a multiple of "
                        f"patch_size {shape.patch_size}")
    return problems


def _persistent(shape: DiTShape, layout: Layout, training: Training, raw: Optional[RawVideo],
                params_rank: int) -> Dict[str, int]:
    mixed = training.dtype_bytes < 4
    name = {2: "bf16/fp16", 4: "fp32"}.get(training.dtype_bytes, f"{training.dtype_bytes} bytes")
    shards = layout.optimizer_shards
    sharded = f", / {shards} (distributed optimizer)" if shards > 1 else ""
    out = {
        f"DiT parameters ({name})": params_rank * training.dtype_bytes,
        "gradient buffer (fp32)": params_rank * 4,
    }
    if mixed:
        out[f"master weights (fp32{sharded})"] = params_rank * 4 // shards
    states = 8 if training.optimizer == "adam" else 4
    label = "Adam states (2 x fp32" if training.optimizer == "adam" else "SGD momentum (fp32"
    out[f"{label}{sharded})"] = params_rank * states // shards
    if training.dpo:
        out[f"DPO reference DiT ({name}, frozen)"] = params_rank * training.dtype_bytes
    if raw is not None:
        if raw.vae is not None:
            out["Video-VAE (frozen)"] = raw.vae_parameters * raw.vae_bytes
        out.update(text_encoder_weights(raw, " text encoder (frozen)"))
    return out


def text_encoder_weights(encoders, kind: str) -> Dict[str, int]:
    """The device bytes of Step-LLM and HunyuanCLIP for a `RawVideo` or a `Sampling` (both carry step_llm, clip,
    their bytes and text_encoder_layerwise_offload), labelled "<name><kind>"."""
    out = {}
    if encoders.step_llm is not None:
        offload = encoders.text_encoder_layerwise_offload
        note = f" (offload: 2 of {encoders.step_llm.num_layers} layers + the rest)" if offload else ""
        out[f"step_llm{kind}{note}"] = encoders.step_llm.device_parameters(offload) * encoders.step_llm_bytes
    if encoders.clip is not None:
        out[f"HunyuanCLIP{kind}"] = encoders.clip.parameters() * encoders.clip_bytes
    return out


def _encoder_phase(raw: RawVideo, micro_batch: int, llm_tokens: int, clip_tokens: int) -> int:
    """The pixel batch on the device while the VAE encodes a chunk, or a text encoder's forward."""
    phases = [0]
    if raw.vae is not None:
        pixels = 4 * micro_batch * raw.num_frames * 3 * raw.height * raw.width  # float32, as the data set gives
        phases.append(pixels + vae_encode_working_bytes(raw.vae, micro_batch, raw.height, raw.width, raw.vae_bytes,
                                                        raw.vae_tile))
    if raw.step_llm is not None:
        phases.append(raw.step_llm.forward_working_bytes(micro_batch, llm_tokens, raw.step_llm_bytes))
    if raw.clip is not None:
        phases.append(raw.clip.forward_working_bytes(micro_batch, clip_tokens, raw.clip_bytes))
    return max(phases)


def encoder_dp_bytes(shape: DiTShape, workload: Workload, raw: RawVideo, dpo: bool, dp: int) -> Tuple[int, int]:
    """(device, host) bytes of encoder DP per rank: the iteration's encoded features (num_micro_batches x
    micro-batch x (latents [+ the i2v condition latents] + step_llm states + CLIP states), as the encoders give them)
    held on every rank, and its float32 pixels held on the host before encoding. DPO: winner and loser videos, one
    prompt."""
    samples = raw.num_micro_batches(workload.batch, dp) * workload.batch
    videos = 2 if dpo else 1
    features, pixels = 0, 0
    if raw.vae is not None:
        latent = shape.in_channels * workload.latent_frames * workload.latent_height * workload.latent_width
        features += videos * latent * (2 if shape.i2v else 1) * raw.vae_bytes
        pixels = 4 * videos * raw.num_frames * 3 * raw.height * raw.width
    llm_channels, clip_channels = shape.caption_channels
    if raw.step_llm is not None:
        features += workload.llm_tokens * llm_channels * raw.step_llm_bytes
    if raw.clip is not None:
        features += workload.clip_tokens * clip_channels * raw.clip_bytes
    return samples * features, samples * pixels


def plan_memory(shape: DiTShape, workload: Workload, layout: Layout, training: Training = Training(),
                raw: Optional[RawVideo] = None) -> MemoryPlan:
    """The per-rank memory of one training step (see the module docstring); `workload.batch` is the micro-batch."""
    dit_work = replace(workload, batch=workload.batch * (2 if training.dpo else 1))
    plan = MemoryPlan(layout=layout, shape=shape, workload=dit_work)
    plan.problems = layout_problems(shape, workload, layout)
    if plan.problems:
        return plan
    params = dit_parameters(shape)
    plan.parameters_total = params.total
    plan.parameters_rank = params.per_rank(layout.tp)
    plan.persistent = _persistent(shape, layout, training, raw, plan.parameters_rank)
    a = training.dtype_bytes

    split = dict(sequence_parallel=layout.sp, ulysses=layout.ulysses)

    def peak_with(recompute: Recompute) -> ActivationPeak:
        return activation_peak(shape, dit_work, layout.tp, layout.cp, recompute, a, training.dtype_bytes, **split)

    plan.activations = peak_with(layout.recompute)
    plan.activations_without_recompute = peak_with(Recompute())
    plan.activations_full_recompute = peak_with(Recompute("block", shape.num_layers))
    plan.phases["forward + backward"] = plan.activations.peak
    if training.dpo:
        # The frozen reference runs after the actor's forward, while the actor's activations wait for backward.
        acts = plan.activations
        plan.phases["DPO reference forward"] = (sum(acts.outside.values()) + acts.saved_by_blocks
                                                + forward_working_bytes(shape, dit_work, layout.tp, layout.cp, a,
                                                                        **split))
    shards = layout.optimizer_shards
    if training.backend == "cpu":
        plan.phases["optimizer step"] = 4 * block_parameters(shape).largest_tp_split // layout.tp
        if shards > 1:
            plan.phases["gradient reduce-scatter (gloo's copy)"] = 4 * plan.parameters_rank
    else:
        plan.phases["optimizer step"] = 4 * plan.parameters_rank // shards
    if raw is not None and (raw.vae is not None or raw.step_llm is not None or raw.clip is not None):
        # DPO encodes the winner and the loser one after the other, and one prompt per pair.
        plan.phases["encoders"] = _encoder_phase(raw, workload.batch, workload.llm_tokens, workload.clip_tokens)
        if raw.encoder_dp and layout.tp * layout.cp > 1:  # at TP x CP = 1 there is no group to share with
            device, host = encoder_dp_bytes(shape, workload, raw, training.dpo, layout.dp)
            plan.held["encoder DP: the iteration's encoded features"] = device
            if host:
                plan.host["encoder DP: the iteration's pixels before encoding"] = host
    return plan


# --- which layouts fit ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    plan: MemoryPlan

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    def cost(self) -> Tuple[int, int, int, int, int, int]:
        """The order of "cheapest": fewest recomputed blocks (each costs one more forward of that block, about a
        third of its step time), then the smallest TP (an all-reduce of the (s, D) activations after each of the
        three row-parallel layers, in forward and backward), then the smallest CP, then the smallest ring (Ulysses'
        all-to-alls of the 1/TP-wide q, k, v and output before hybrid, before a ring's r - 1 steps of K and V with
        smaller attention kernels), then sequence parallel off (the same traffic as the all-reduce, plus an
        all-gather of each column-parallel input in backward), then the plain optimizer (the distributed one adds a
        reduce-scatter and an all-gather per step)."""
        lay = self.layout
        return (lay.recompute.recomputed_layers(self.plan.shape.num_layers), lay.tp, lay.cp, lay.ring, int(lay.sp),
                int(lay.distributed_optimizer))


def candidate_layouts(shape: DiTShape, workload: Workload, world: int,
                      node_size: Optional[int] = None) -> List[Layout]:
    """The layouts (no recompute) with TP x CP dividing the world size that the model allows: for each TP (a divisor
    of `node_size` when given, so that a TP group stays within a node) and CP, sequence parallel off and on (TP > 1),
    the context-parallel algorithms (Ulysses where TP x CP divides the heads, ring, and hybrid with each Ulysses
    degree 1 < u < CP that divides CP and with TP x u dividing the heads), and the distributed optimizer where
    DP x CP > 1 (with one rank per optimizer it changes nothing)."""
    out = []
    for tp in range(1, world + 1):
        if world % tp or (node_size is not None and node_size % tp):
            continue
        for cp in range(1, world // tp + 1):
            if (world // tp) % cp:
                continue
            dp = world // (tp * cp)
            algos = [("ulysses_cp_algo", None)]
            if cp > 1:
                algos.append(("megatron_cp_algo", None))
                algos += [("hybrid_cp_algo", u) for u in range(2, cp) if cp % u == 0]
            for algo, u in algos:
                for sp in ((False, True) if tp > 1 else (False,)):
                    layout = Layout(tp, cp, dp, sequence_parallel=sp, cp_algo=algo, ulysses_degree=u)
                    if layout_problems(shape, workload, layout):
                        continue
                    out.append(layout)
                    if dp * cp > 1:
                        out.append(replace(layout, distributed_optimizer=True))
    return out


def fitting_layouts(shape: DiTShape, workload: Workload, world: int, budget_bytes: float,
                    training: Training = Training(), raw: Optional[RawVideo] = None,
                    node_size: Optional[int] = None) -> List[Fit]:
    """For each candidate layout (`candidate_layouts`), the least block recompute whose peak is within
    `budget_bytes`; cheapest first (see `Fit.cost`). The peak falls as more blocks are recomputed (each keeps only
    its input), so the least is found by bisection."""
    fits = []
    layers = shape.num_layers

    def planned(layout: Layout, recomputed: int) -> MemoryPlan:
        recompute = Recompute("block", recomputed) if recomputed else Recompute()
        return plan_memory(shape, workload, replace(layout, recompute=recompute), training, raw)

    for layout in candidate_layouts(shape, workload, world, node_size):
        best = planned(layout, layers)
        if best.peak > budget_bytes:
            continue
        low, high = 0, layers  # high fits; find the least that does
        while low < high:
            mid = (low + high) // 2
            plan = planned(layout, mid)
            if plan.peak <= budget_bytes:
                high, best = mid, plan
            else:
                low = mid + 1
        fits.append(Fit(best))  # the plan of `high`
    return sorted(fits, key=Fit.cost)


def smallest_peak(shape: DiTShape, workload: Workload, world: int, training: Training = Training(),
                  raw: Optional[RawVideo] = None, node_size: Optional[int] = None) -> Optional[MemoryPlan]:
    """The layout with the lowest peak (full recompute): what comes closest when nothing fits."""
    best = None
    for layout in candidate_layouts(shape, workload, world, node_size):
        layout = replace(layout, recompute=Recompute("block", shape.num_layers))
        plan = plan_memory(shape, workload, layout, training, raw)
        if best is None or plan.peak < best.peak:
            best = plan
    return best


# --- sampling (inference) -------------------------------------------------------------------

# Prompts per text-encoder call (mindspeed_mm/inference/runner.py's TEXT_ENCODER_BATCH; not imported: it imports
# torch). The negative prompt is encoded with them.
TEXT_ENCODER_BATCH = 8
ENCODE_TEXT, SAMPLE, DECODE = "encode text", "sample", "decode"


@dataclass(frozen=True)
class Sampling:
    """What inference_sora.py runs, from the inference JSON and the flags."""

    videos: int = 1  # videos per batch (the micro-batch)
    num_frames: int = 204
    height: int = 544
    width: int = 992
    dit_bytes: int = 2  # predictor.dtype
    guided: bool = True  # guidance_scale > 1: a conditional and an unconditional half
    cfg_parallel: bool = False  # --use-cfg-parallel: each half on its own model copy
    unload_text_encoder: bool = False
    dit_layerwise_offload: bool = False  # the blocks in host memory, at most two on the device
    text_encoder_layerwise_offload: bool = False  # Step-LLM's layers likewise
    vae: VAEShape = VAEShape()
    vae_parameters: int = 0
    vae_bytes: int = 2
    vae_tile: Optional[int] = None  # ae.tile_sample_size with use_tiling, else None
    step_llm: Optional[StepLLMShape] = None
    step_llm_bytes: int = 2
    clip: Optional[BertShape] = None
    clip_bytes: int = 4

    @property
    def dit_batch(self) -> int:
        """Samples in one DiT forward: both halves together, unless CFG parallel gives each its own copy."""
        return self.videos * (2 if self.guided and not self.cfg_parallel else 1)


@dataclass
class SamplingPlan:
    """Per-rank device memory of each inference phase, term by term, in bytes; `problems` instead when the layout
    cannot run."""

    layout: Layout
    shape: DiTShape
    workload: Workload  # the DiT's batch (dit_batch samples)
    sampling: Sampling
    problems: List[str] = field(default_factory=list)
    parameters_rank: int = 0
    forward: Optional[SamplingForward] = None
    decode_moments: Dict[str, int] = field(default_factory=dict)
    phases: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.problems

    def phase_total(self, name: str) -> int:
        return sum(self.phases[name].values())

    @property
    def peak_phase(self) -> Optional[str]:
        return max(self.phases, key=self.phase_total) if self.valid else None

    @property
    def peak(self) -> Optional[int]:
        return self.phase_total(self.peak_phase) if self.valid else None


def decode_moments(run: Sampling, layout: Layout, latent_frames: int) -> Dict[str, int]:
    """The decode's moments beyond the weights and latents (StepVideoVAE.decode, then to_uint8), in bytes.

    Without a decode group (TP x CP = 1) the video (b, T, 3, H, W) is written chunk by chunk into one buffer while
    each chunk decodes; with one, each rank decodes its share of the chunks into a buffer of per-rank x 17 frames,
    all-gathers every rank's buffer and concatenates them into the video. to_uint8 then holds two float32 copies of
    the video at once (float(), clamp, + 1) besides it."""
    vae, a = run.vae, run.vae_bytes
    frame = run.videos * 3 * run.height * run.width
    chunks = -(-latent_frames // vae.latent_len)
    group = layout.tp * layout.cp
    per_rank = -(-chunks // group)
    buffer_frames = run.num_frames if group == 1 else per_rank * vae.frame_len
    working = vae_decode_working_bytes(vae, run.videos, run.height, run.width, a, run.vae_tile)
    tiling = f"tiled {run.vae_tile} px" if run.vae_tile else "untiled"
    moments = {f"a chunk ({tiling}, estimate) + output buffer": frame * a * buffer_frames + working}
    if group > 1:
        moments["gathering the ranks' chunks"] = frame * a * (group * per_rank * vae.frame_len
                                                                             + run.num_frames)
    moments["uint8 conversion (video + 2 float32 copies)"] = frame * run.num_frames * (a + 2 * FP32)
    return moments


def plan_sampling(shape: DiTShape, workload: Workload, layout: Layout, run: Sampling) -> SamplingPlan:
    """Peak device memory per rank of inference (`inference_sora.py`), phase by phase; the phases run one after the
    other on every rank:

      encode text  the text encoders' weights and one call's forward (TEXT_ENCODER_BATCH prompts), on the first
                   rank of each TP x CP group (the others receive the states); the DiT is not loaded yet
                   (runner.encode_plan_prompts runs before build_pipeline)
      sample       the DiT's weights (/ TP where split; with dit_layerwise_offload those outside the blocks and
                   two blocks), the VAE's, the text encoders' unless unload_text_encoder
                   moved them to the host, the latents and text conditions, and one forward without autograd
      decode       the same weights, the decoded video's buffers and one chunk's decode (the conditional half's
                   ranks decode under CFG parallel; the VAE splits the chunks over the TP x CP group)

    `workload.batch` is the videos per batch; the DiT runs `run.dit_batch` samples."""
    dit_work = replace(workload, batch=run.dit_batch)
    plan = SamplingPlan(layout=layout, shape=shape, workload=dit_work, sampling=run)
    plan.problems = layout_problems(shape, workload, layout)
    if plan.problems:
        return plan
    a = run.dit_bytes
    plan.parameters_rank = dit_parameters(shape).per_rank(layout.tp)
    encoders = text_encoder_weights(run, " weights")
    working = [0]
    if run.step_llm is not None:
        working.append(run.step_llm.forward_working_bytes(TEXT_ENCODER_BATCH, workload.llm_tokens,
                                                          run.step_llm_bytes))
    if run.clip is not None:
        working.append(run.clip.forward_working_bytes(TEXT_ENCODER_BATCH, workload.clip_tokens, run.clip_bytes))
    plan.phases[ENCODE_TEXT] = {**encoders, "text encoder forward (one call)": max(working)}

    if run.dit_layerwise_offload:  # models/common/offload.py: the running block and the prefetched next one
        block = block_parameters(shape).per_rank(layout.tp)
        weights = {f"DiT weights: 2 of {shape.num_layers} blocks + the rest (offload)":
                   (plan.parameters_rank - (shape.num_layers - 2) * block) * a}
    else:
        weights = {f"DiT weights ({'fp32' if a == 4 else 'bf16/fp16'}, / TP {layout.tp} where split)":
                   plan.parameters_rank * a}
    if run.vae_parameters:
        weights["Video-VAE weights"] = run.vae_parameters * run.vae_bytes
    if not run.unload_text_encoder:
        weights.update({f"{name} (kept: unload_text_encoder false)": value for name, value in encoders.items()})

    latent = shape.in_channels * workload.latent_frames * workload.latent_height * workload.latent_width
    llm_channels, clip_channels = shape.caption_channels
    # float32 latents, velocity after guidance and the next step's latents; the DiT's input, its i2v condition and
    # its output in the DiT's dtype; the text conditions (both halves, as the encoders gave them).
    inputs = (FP32 * run.videos * latent * 3 + a * dit_work.batch * latent * (3 if shape.i2v else 2)
              + 2 * run.videos * (workload.llm_tokens * llm_channels * run.step_llm_bytes
                                  + workload.clip_tokens * clip_channels * run.clip_bytes))
    plan.forward = sampling_forward(shape, dit_work, layout.tp, layout.cp, a, sequence_parallel=layout.sp,
                                    ulysses=layout.ulysses)
    forward = plan.forward
    moment = ("patch embedding" if forward.patch_embedding > forward.shared + forward.block else
              f"a block's {'FFN' if forward.feed_forward >= forward.self_attention else 'self-attention'} + shared")
    plan.phases[SAMPLE] = {**weights, "latents and text conditions": inputs,
                           f"DiT forward, no autograd ({moment})": forward.peak}

    plan.decode_moments = decode_moments(run, layout, workload.latent_frames)
    name = max(plan.decode_moments, key=plan.decode_moments.get)
    plan.phases[DECODE] = {**weights, "latents": FP32 * run.videos * latent,
                           f"VAE decode: {name}": plan.decode_moments[name]}
    return plan
