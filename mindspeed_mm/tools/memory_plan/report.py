"""The planner's printed report: the per-rank breakdown of one layout, and the layouts that fit."""

from __future__ import annotations

from typing import List, Optional

from .plan import GIB, Fit, MemoryPlan

BLOCK_FORMULA = (
    "kept by one block (bytes), a = bytes per activation element, c = 4 if a < 4 else 0 (the q/k RMSNorm's float32\n"
    "    copy), s = micro-batch x tokens / CP, Dl = D/TP, Fl = 4D/TP, T = text keys:\n"
    "      residual stream 9a s D + self-attention (8a + 2c) s Dl [CP 1] or (7a + 2c) s Dl [CP > 1]\n"
    "      + cross-attention (4 + 3a) s Dl + a s T + FFN 2a s Fl\n"
    "      (+ float32 softmax and norm statistics, and the text-sized keys);\n"
    "    a recomputed block keeps only its input, a s D, and is rebuilt during its backward")


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _rows(items, width: int = 62) -> List[str]:
    return [f"  {name:<{width}} {_gib(value):>9}" for name, value in items]


def format_header(inputs) -> List[str]:
    shape, work = inputs.shape, inputs.workload
    frames, height, width = inputs.video
    tokens = work.tokens(shape.patch_size)
    what = "DPO post-training" if inputs.entry == "dpo" else "pretraining"
    kind = "i2v" if shape.i2v else "t2v"
    data = "raw videos (frozen encoders loaded)" if inputs.raw is not None else "extracted features"
    dtype = {2: "bf16", 4: "fp32"}[inputs.training.dtype_bytes]
    vae = inputs.vae
    lines = [
        f"StepVideo memory plan, per rank: {kind} {what} on {data}, {dtype}",
        f"  DiT: {shape.num_layers} layers, hidden {shape.hidden} ({shape.num_heads} heads x {shape.head_dim}), "
        f"patch {shape.patch_size}",
        f"  video: {frames} frames {height}x{width} -> {work.latent_frames} latent frames x {work.latent_height} x "
        f"{work.latent_width} = {tokens:,} tokens per sample (VAE v{vae.version}: {vae.frame_len} frames -> "
        f"{vae.latent_len} latents, {vae.spatial_factor}x{vae.spatial_factor} pixels -> 1)",
        f"  text: up to {work.text_tokens} keys (CLIP {work.clip_tokens} + step_llm {work.llm_tokens})",
    ]
    for note in inputs.notes:
        lines.append(f"  {note}")
    return lines


def format_plan(inputs, plan: Optional[MemoryPlan]) -> str:
    lines = format_header(inputs)
    mbs = inputs.workload.batch
    if plan is None or not plan.valid:
        problems = inputs.problems + (plan.problems if plan is not None else [])
        tp, cp = inputs.tp_cp
        lines.append(f"  layout: world {inputs.world}, TP {tp} x CP {cp}: invalid, no estimate:")
        lines += [f"    - {p}" for p in problems]
        return "\n".join(lines)
    lay, shape = plan.layout, plan.shape
    layers = shape.num_layers
    dit_batch = plan.workload.batch
    lines.append(f"  layout: world {lay.world} = {lay.describe(layers)}; micro-batch {mbs}"
                 + (f" (the actor runs winner and loser: {dit_batch} samples)" if dit_batch != mbs else ""))
    if lay.distributed_optimizer and lay.optimizer_shards == 1:
        lines.append("  (the distributed optimizer shards over DP x CP = 1 rank here: no saving)")
    lines.append("")
    lines.append(f"  {'persistent':<62} {'GiB':>9}")
    lines.append(f"  DiT parameters on this rank: {plan.parameters_rank:,} of {plan.parameters_total:,}")
    lines += _rows(plan.persistent.items())
    lines += _rows([("= persistent", plan.persistent_total)])
    acts = plan.activations
    block = acts.block
    s = dit_batch * plan.workload.tokens(shape.patch_size) // lay.cp
    lines.append("")
    lines.append(f"  activations (s = {s:,} tokens on this rank)")
    lines.append("  " + BLOCK_FORMULA.replace("\n", "\n  "))
    lines += _rows([
        ("one block kept: residual stream", block.residual),
        ("              self-attention", block.self_attention),
        ("              cross-attention", block.cross_attention),
        ("              FFN", block.feed_forward),
        ("one block kept, total (no recompute)", block.total),
        ("one recomputed block kept (its input)", block.checkpoint_input),
        (f"all {layers} blocks kept, no recompute", layers * block.total),
        (f"all {layers} blocks kept, full recompute", layers * block.checkpoint_input),
        (f"all {layers} blocks kept, this layout ({lay.recompute.describe(layers)})", acts.saved_by_blocks),
    ])
    lines += _rows((f"outside the blocks: {name}", value) for name, value in acts.outside.items())
    lines += _rows([
        ("backward working set (gradients in flight, one weight grad)", acts.backward_working),
        ("forward + backward peak, no recompute", plan.activations_without_recompute.peak),
        ("forward + backward peak, full recompute", plan.activations_full_recompute.peak),
        ("forward + backward peak, this layout", acts.peak),
    ])
    lines.append("")
    lines.append(f"  {'transient phases (they do not overlap)':<62} {'GiB':>9}")
    lines += _rows(plan.phases.items())
    lines.append("")
    lines.append(f"  peak: {_gib(plan.peak)} GiB = persistent {_gib(plan.persistent_total)} + {plan.peak_phase} "
                 f"{_gib(plan.phases[plan.peak_phase])}")
    return "\n".join(lines)


def format_fits(inputs, fits: List[Fit], capacity_gib: float, margin: float, closest: Optional[MemoryPlan],
                limit: int) -> str:
    budget = capacity_gib * (1 - margin)
    layers = inputs.shape.num_layers
    lines = [
        "",
        f"layouts that fit {capacity_gib:g} GB per device (peak <= {budget:.1f} GiB: {margin:.0%} kept free for "
        f"what the model leaves out), world {inputs.world}, micro-batch {inputs.workload.batch}, with the least "
        f"block recompute each needs; cheapest first: fewest recomputed blocks, then smallest TP, then smallest CP, "
        f"then the plain optimizer",
    ]
    if not fits:
        lines.append("  none fits.")
        if closest is not None:
            lines.append(f"  lowest peak: {_gib(closest.peak)} GiB with {closest.layout.describe(layers)}")
        return "\n".join(lines)
    lines.append(f"  {'TP':>3} {'CP':>3} {'DP':>4}  {'recomputed blocks':>17}  {'optimizer':<12} {'peak GiB':>9}")
    for fit in fits[:limit]:
        lay = fit.layout
        lines.append(f"  {lay.tp:>3} {lay.cp:>3} {lay.dp:>4}  {lay.recompute.recomputed_layers(layers):>10} of "
                     f"{layers:<3}  {'distributed' if lay.distributed_optimizer else 'plain':<12} "
                     f"{_gib(fit.plan.peak):>9}")
    if len(fits) > limit:
        lines.append(f"  ... and {len(fits) - limit} more (--max-layouts)")
    return "\n".join(lines)
