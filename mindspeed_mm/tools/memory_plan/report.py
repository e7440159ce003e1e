"""The planner's printed report: the per-rank breakdown of one layout, and the layouts that fit."""

from __future__ import annotations

from typing import List, Optional

from .dit import block_parameters, dit_parameters
from .plan import _ALGO_NAMES, GIB, Fit, MemoryPlan

BLOCK_FORMULA = (
    "kept by one block (bytes), a = bytes per activation element, c = 4 if a < 4 else 0 (the q/k RMSNorm's float32\n"
    "    copy), s = micro-batch x padded tokens / CP, s' = s / TP with sequence parallel else s, Dl = D/TP,\n"
    "    Fl = 4D/TP, T = text keys, u = Ulysses degree:\n"
    "      residual stream 9a s' D + self-attention (8a + 2c) s Dl [u = 1] or (7a + 2c) s Dl [u > 1]\n"
    "      + cross-attention (4 + 3a) s Dl + a s T + FFN 2a s Fl\n"
    "      (+ float32 softmax and norm statistics, and the text-sized keys);\n"
    "    a recomputed block keeps only its input, a s' D, and is rebuilt during its backward")


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _rows(items, width: int = 66) -> List[str]:
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
        lines.append(f"  layout: world {inputs.world}, {inputs.flags_layout.flags()}: invalid, no estimate:")
        lines += [f"    - {p}" for p in problems]
        return "\n".join(lines)
    lay, shape = plan.layout, plan.shape
    layers = shape.num_layers
    dit_batch = plan.workload.batch
    lines.append(f"  layout: world {lay.world} = {lay.describe(layers)}; micro-batch {mbs}"
                 + (f" (the actor runs winner and loser: {dit_batch} samples)" if dit_batch != mbs else ""))
    if lay.distributed_optimizer and lay.optimizer_shards == 1:
        lines.append("  (the distributed optimizer shards over DP x CP = 1 rank here: no saving)")
    lines += _split_lines(plan)
    lines.append("")
    lines.append(f"  {'persistent':<66} {'GiB':>9}")
    lines.append(f"  DiT parameters on this rank: {plan.parameters_rank:,} of {plan.parameters_total:,}")
    lines += _rows(plan.persistent.items())
    lines += _rows([("= persistent", plan.persistent_total)])
    acts = plan.activations
    block = acts.block
    split, tokens = lay.split, plan.workload.tokens(shape.patch_size)
    s, s_stream = dit_batch * split.rank_tokens(tokens), dit_batch * split.stream_tokens(tokens)
    lines.append("")
    lines.append(f"  activations (s = {s:,} tokens on this rank, s' = {s_stream:,} outside the TP matmuls)")
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
    if block.attention_transient:
        lines += _rows([("ring attention in flight (2 x K/V buffers, fp32 score block)", block.attention_transient)])
    lines += _rows([
        ("backward working set (gradients in flight, one weight grad)", acts.backward_working),
        ("forward + backward peak, no recompute", plan.activations_without_recompute.peak),
        ("forward + backward peak, full recompute", plan.activations_full_recompute.peak),
        ("forward + backward peak, this layout", acts.peak),
    ])
    lines.append("")
    lines.append(f"  {'transient phases (they do not overlap)':<66} {'GiB':>9}")
    lines += _rows(plan.phases.items())
    if plan.held or plan.host:
        raw = inputs.raw
        micro = raw.num_micro_batches(mbs, lay.dp) if raw is not None else 1
        lines.append("")
        lines.append(f"  {'encoder DP (enable_encoder_dp; ' + str(micro) + ' micro-batches x ' + str(mbs) + ')':<66} "
                     f"{'GiB':>9}")
        lines += _rows((f"{name} (device, held through the step)", value) for name, value in plan.held.items())
        lines += _rows((f"{name} (host, not in the peak)", value) for name, value in plan.host.items())
    lines.append("")
    held = f" + encoder DP {_gib(plan.held_total)}" if plan.held else ""
    lines.append(f"  peak: {_gib(plan.peak)} GiB = persistent {_gib(plan.persistent_total)}{held} + "
                 f"{plan.peak_phase} {_gib(plan.phases[plan.peak_phase])}")
    return "\n".join(lines)


def _split_lines(plan: MemoryPlan) -> List[str]:
    """How this rank's tokens come about: the padding, sequence parallel, the Ulysses exchange and the ring."""
    lay, shape = plan.layout, plan.shape
    split = lay.split
    tokens = plan.workload.tokens(shape.patch_size)
    padded = split.padded_tokens(tokens)
    multiple = lay.cp * (lay.tp if split.sp else 1)
    pad = (f"padded to {padded:,} (a multiple of {'CP x TP' if split.sp else 'CP'} = {multiple}; "
           f"{padded - tokens:,} masked)" if padded != tokens else f"a multiple of {multiple}, no padding")
    line = f"  tokens per sample: {tokens:,}, {pad}; {split.rank_tokens(tokens):,} on this rank"
    if split.sp:
        line += f", {split.stream_tokens(tokens):,} outside the TP matmuls (sequence parallel)"
    lines = [line]
    if lay.cp > 1:
        core = (f"  self-attention core: {split.core_tokens(tokens):,} tokens x "
                f"{split.core_heads(shape.num_heads)} heads per sample")
        if split.ulysses_degree > 1:
            core += f" after Ulysses' all-to-all over {split.ulysses_degree} ranks"
        if split.ring > 1:
            core += f"; ring of {split.ring} ranks passing K and V"
        lines.append(core)
    return lines


def format_fits(inputs, fits: List[Fit], capacity_gib: float, margin: float, closest: Optional[MemoryPlan],
                limit: int, node_size: Optional[int] = None) -> str:
    budget = capacity_gib * (1 - margin)
    layers = inputs.shape.num_layers
    tp_limit = f", TP dividing {node_size} (within a node)" if node_size is not None else ""
    lines = [
        "",
        f"layouts that fit {capacity_gib:g} GB per device (peak <= {budget:.1f} GiB: {margin:.0%} kept free for "
        f"what the model leaves out), world {inputs.world}{tp_limit}, micro-batch {inputs.workload.batch}, with the "
        f"least block recompute each needs; cheapest first: fewest recomputed blocks, then smallest TP, then "
        f"smallest CP, then Ulysses before hybrid before ring, then sequence parallel off, then the plain optimizer",
    ]
    if not fits:
        lines.append("  none fits.")
        if closest is not None:
            lines.append(f"  lowest peak: {_gib(closest.peak)} GiB with {closest.layout.describe(layers)}")
        return "\n".join(lines)
    lines.append(f"  {'layout':<24} {'DP':>4}  {'recomputed blocks':>17}  {'optimizer':<12} {'peak GiB':>9}")
    for fit in fits[:limit]:
        lay = fit.layout
        lines.append(f"  {lay.flags():<24} {lay.dp:>4}  {lay.recompute.recomputed_layers(layers):>10} of "
                     f"{layers:<3}  {'distributed' if lay.distributed_optimizer else 'plain':<12} "
                     f"{_gib(fit.plan.peak):>9}")
    if len(fits) > limit:
        lines.append(f"  ... and {len(fits) - limit} more (--max-layouts)")
    lines.append("  (layout: TPt CPc with the context-parallel algorithm: ulysses = --context-parallel-algo "
                 "ulysses_cp_algo, ring = megatron_cp_algo, hybrid uN = hybrid_cp_algo --ulysses-degree-in-cp N; "
                 "+SP = --sequence-parallel)")
    return "\n".join(lines)


def format_sampling(inputs, plan) -> str:
    """The sampling plan (`cli.sampling_plan`): the settings, each phase term by term, and the peak."""
    shape, work, run, lay = inputs.shape, inputs.workload, inputs.sampling, inputs.layout
    frames, height, width = inputs.video
    tokens = work.tokens(shape.patch_size)
    vae = run.vae
    kind = "i2v" if shape.i2v else "t2v"
    dtype = "fp32" if run.dit_bytes == 4 else "bf16/fp16"
    if not run.guided:
        cfg = f"no classifier-free guidance (guidance_scale {inputs.guidance_scale:g}): {run.videos} sample(s)"
    elif run.cfg_parallel:
        cfg = (f"guidance_scale {inputs.guidance_scale:g}, CFG parallel: each model copy runs one half, "
               f"{run.dit_batch} sample(s) a forward")
    else:
        cfg = (f"guidance_scale {inputs.guidance_scale:g}: conditional and unconditional halves together, "
               f"{run.dit_batch} samples a forward")
    lines = [
        f"StepVideo memory plan, per rank: {kind} sampling (inference), DiT in {dtype}",
        f"  DiT: {shape.num_layers} layers, hidden {shape.hidden} ({shape.num_heads} heads x {shape.head_dim}), "
        f"patch {shape.patch_size}",
        f"  video: {frames} frames {height}x{width} -> {work.latent_frames} latent frames x {work.latent_height} x "
        f"{work.latent_width} = {tokens:,} tokens per sample (VAE v{vae.version}: {vae.frame_len} frames -> "
        f"{vae.latent_len} latents, {vae.spatial_factor}x{vae.spatial_factor} pixels -> 1)",
        f"  {run.videos} video(s) per batch; {cfg}",
        f"  text: up to {work.text_tokens} keys (CLIP {work.clip_tokens} + step_llm {work.llm_tokens})",
        "  unload_text_encoder true: the text encoders leave the device before the DiT loads" if run.unload_text_encoder
        else "  unload_text_encoder false: the text encoders stay on the device through sampling and decoding",
    ]
    block_bytes = block_parameters(shape).per_rank(lay.tp) * run.dit_bytes
    offloaded = [("dit_layerwise_offload", "the DiT's blocks", shape.num_layers * block_bytes)]
    if run.step_llm is not None:
        offloaded.append(("text_encoder_layerwise_offload", "Step-LLM's layers",
                          run.step_llm.num_layers * run.step_llm.layer_parameters() * run.step_llm_bytes))
    for key, what, host in offloaded:
        if getattr(run, key):
            lines.append(f"  {key} true: {what} ({host / GIB:.1f} GiB) stay in pinned host memory, each copied to "
                         f"the device just before it runs: every one crosses PCIe once per forward")
    lines += [f"  {note}" for note in inputs.notes]
    copies = " x 2 model copies (CFG parallel)" if run.cfg_parallel else ""
    layout = f"TP {lay.tp} x CP {lay.cp}" + (f" ({_ALGO_NAMES[lay.cp_algo]})" if lay.cp > 1 else "")
    layout += (", sequence parallel" if lay.sp else "") + copies
    if not plan.valid:
        lines.append(f"  layout: {layout}: invalid, no estimate:")
        lines += [f"    - {p}" for p in plan.problems]
        return "\n".join(lines)
    lines.append(f"  layout: {layout} = {inputs.world} rank(s); DiT parameters on this rank: "
                 f"{plan.parameters_rank:,} of {dit_parameters(shape).total:,}")
    lines += _split_lines_for(lay, shape, plan.workload)
    forward = plan.forward
    for phase, terms in plan.phases.items():
        lines.append("")
        lines.append(f"  {'phase: ' + phase:<66} {'GiB':>9}")
        lines += _rows(terms.items())
        lines += _rows([(f"= {phase}", plan.phase_total(phase))])
    lines.append("")
    lines.append(f"  {'the DiT forward without autograd, its moments (nothing kept for backward)':<66} {'GiB':>9}")
    lines += _rows([
        ("shared by the blocks (RoPE, text, modulation)", forward.shared),
        ("one block: residual stream + self-attention's worst moment", forward.self_attention),
        ("one block: residual stream + FFN hidden before and after GELU", forward.feed_forward),
        ("patch embedding (whole sequence, before the split)", forward.patch_embedding),
    ])
    lines.append("")
    lines.append(f"  {'VAE decode, its moments beyond weights and latents':<66} {'GiB':>9}")
    lines += _rows(plan.decode_moments.items())
    lines.append("  (the chunk's decode is an estimate from float32 CPU figures, halved in bf16: docs/performance.md, "
                 "Video-VAE)")
    lines.append("")
    lines.append(f"  peak: {_gib(plan.peak)} GiB in the {plan.peak_phase} phase ("
                 + ", ".join(f"{name} {_gib(plan.phase_total(name))}" for name in plan.phases) + ")")
    if inputs.device_memory_gb is not None:
        budget = inputs.device_memory_gb * (1 - inputs.memory_margin)
        verdict = "fits" if plan.peak <= budget * GIB else "does not fit"
        lines.append(f"  {verdict} {inputs.device_memory_gb:g} GB per device (peak <= {budget:.1f} GiB: "
                     f"{inputs.memory_margin:.0%} kept free for what the model leaves out)")
    return "\n".join(lines)


def _split_lines_for(layout, shape, workload) -> List[str]:
    """`_split_lines` for a layout and workload without a training plan."""
    return _split_lines(MemoryPlan(layout=layout, shape=shape, workload=workload))
