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
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from .dit import (ActivationPeak, DiTShape, Recompute, Workload, activation_peak, block_parameters, dit_parameters,
                  forward_working_bytes)
from .encoders import BertShape, StepLLMShape, VAEShape, vae_encode_working_bytes

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    recompute: Recompute = Recompute()
    distributed_optimizer: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp

    @property
    def optimizer_shards(self) -> int:
        return self.dp * self.cp if self.distributed_optimizer else 1

    def describe(self, num_layers: int) -> str:
        return (f"TP {self.tp} x CP {self.cp} x DP {self.dp}, recompute {self.recompute.describe(num_layers)}, "
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
    clip: Optional[BertShape] = None
    clip_bytes: int = 4


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

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def persistent_total(self) -> int:
        return sum(self.persistent.values())

    @property
    def peak_phase(self) -> Optional[str]:
        return max(self.phases, key=self.phases.get) if self.valid else None

    @property
    def peak(self) -> Optional[int]:
        """Persistent memory plus the largest transient phase; None for a layout that cannot run."""
        return self.persistent_total + max(self.phases.values()) if self.valid else None


def layout_problems(shape: DiTShape, workload: Workload, layout: Layout) -> List[str]:
    """Why a layout cannot run this model and video (the checks the DiT and the launcher make)."""
    problems = []
    if shape.num_heads % (layout.tp * layout.cp):
        problems.append(f"num_heads {shape.num_heads} is not divisible by TP {layout.tp} x CP {layout.cp} = "
                        f"{layout.tp * layout.cp}")
    if workload.latent_frames % layout.cp:
        problems.append(f"{workload.latent_frames} latent frames are not divisible by CP {layout.cp}")
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
        if raw.step_llm is not None:
            out["step_llm text encoder (frozen)"] = raw.step_llm.parameters() * raw.step_llm_bytes
        if raw.clip is not None:
            out["HunyuanCLIP text encoder (frozen)"] = raw.clip.parameters() * raw.clip_bytes
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

    def peak_with(recompute: Recompute) -> ActivationPeak:
        return activation_peak(shape, dit_work, layout.tp, layout.cp, recompute, a, training.dtype_bytes)

    plan.activations = peak_with(layout.recompute)
    plan.activations_without_recompute = peak_with(Recompute())
    plan.activations_full_recompute = peak_with(Recompute("block", shape.num_layers))
    plan.phases["forward + backward"] = plan.activations.peak
    if training.dpo:
        # The frozen reference runs after the actor's forward, while the actor's activations wait for backward.
        acts = plan.activations
        plan.phases["DPO reference forward"] = (sum(acts.outside.values()) + acts.saved_by_blocks
                                                + forward_working_bytes(shape, dit_work, layout.tp, layout.cp, a))
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
    return plan


# --- which layouts fit ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    plan: MemoryPlan

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    def cost(self) -> Tuple[int, int, int, int]:
        """The order of "cheapest": fewest recomputed blocks (each costs one more forward of that block, about a
        third of its step time), then the smallest TP (an all-reduce of the (s, D) activations after each of the
        three row-parallel layers, in forward and backward), then the smallest CP (Ulysses: all-to-alls of the
        1/TP-wide q, k, v and output), then the plain optimizer (the distributed one adds a reduce-scatter and an
        all-gather per step)."""
        lay = self.layout
        return (lay.recompute.recomputed_layers(self.plan.shape.num_layers), lay.tp, lay.cp,
                int(lay.distributed_optimizer))


def candidate_layouts(shape: DiTShape, workload: Workload, world: int) -> List[Tuple[int, int, bool]]:
    """(TP, CP, distributed optimizer) with TP x CP dividing the world size and the model; the distributed optimizer
    only where DP x CP > 1 (with one rank per optimizer it changes nothing)."""
    out = []
    for tp in range(1, world + 1):
        if world % tp:
            continue
        for cp in range(1, world // tp + 1):
            if (world // tp) % cp:
                continue
            layout = Layout(tp, cp, world // (tp * cp))
            if layout_problems(shape, workload, layout):
                continue
            out.append((tp, cp, False))
            if layout.dp * cp > 1:
                out.append((tp, cp, True))
    return out


def fitting_layouts(shape: DiTShape, workload: Workload, world: int, budget_bytes: float,
                    training: Training = Training(), raw: Optional[RawVideo] = None) -> List[Fit]:
    """For each (TP, CP, distributed optimizer), the least block recompute whose peak is within `budget_bytes`;
    cheapest first (see `Fit.cost`)."""
    fits = []
    for tp, cp, distributed in candidate_layouts(shape, workload, world):
        for recomputed in range(shape.num_layers + 1):
            recompute = Recompute("block", recomputed) if recomputed else Recompute()
            layout = Layout(tp, cp, world // (tp * cp), recompute, distributed)
            plan = plan_memory(shape, workload, layout, training, raw)
            if plan.peak <= budget_bytes:
                fits.append(Fit(plan))
                break
    return sorted(fits, key=Fit.cost)


def smallest_peak(shape: DiTShape, workload: Workload, world: int, training: Training = Training(),
                  raw: Optional[RawVideo] = None) -> Optional[MemoryPlan]:
    """The layout with the lowest peak (full recompute, distributed optimizer where possible): what comes closest
    when nothing fits."""
    best = None
    for tp, cp, distributed in candidate_layouts(shape, workload, world):
        layout = Layout(tp, cp, world // (tp * cp), Recompute("block", shape.num_layers), distributed)
        plan = plan_memory(shape, workload, layout, training, raw)
        if best is None or plan.peak < best.peak:
            best = plan
    return best
