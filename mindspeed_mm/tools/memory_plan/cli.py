"""`python -m mindspeed_mm.tools.memory_plan`: the launchers' flags and JSON files in, the per-rank plan out.

    python -m mindspeed_mm.tools.memory_plan \\
        --mm-model examples/stepvideo/t2v/pretrain_t2v_model.json \\
        --mm-data examples/stepvideo/t2v/data_static_resolution.json \\
        --tensor-model-parallel-size 8 --context-parallel-size 1 --micro-batch-size 1 --bf16 \\
        --recompute-granularity full --recompute-method block --recompute-num-layers 48 \\
        --use-distributed-optimizer --world-size 8 --device-memory-gb 64

Every flag of the launchers is accepted (the same parser); the ones that do not change memory are ignored, and no
file the JSONs name has to exist (the weights' config files are read when they are there, for the encoders' sizes).
The sequence's split is the launchers': --sequence-parallel, --context-parallel-algo, --ulysses-degree-in-cp (as
`arguments.sequence_options` reads them), and the model JSON's enable_encoder_dp.

With --inference (automatic for an inference JSON, one with pipeline_config, given without --mm-data) it plans
sampling instead: the peak of encoding the prompts, sampling and decoding, per rank (`plan.plan_sampling`).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

# The launchers' own checks of flags and configs, without `validate_args`: that also requires every file the JSONs
# name (weights, data) to exist, which a plan made before the files are in place must not.
from ...arguments import ArgumentError, _check_era_flags, _reject_unknown, _validate_recompute, build_parser
from ...arguments import load_mm_configs, sequence_options
from ...config.aliases import collect_notices
from ...errors import MindSpeedMMError
from .dit import DiTShape, Recompute, Workload
from .encoders import RELEASED_VAE_PARAMETERS, BertShape, StepLLMShape, VAEShape
from .plan import (CP_ALGOS, GIB, Layout, RawVideo, Sampling, SamplingPlan, Training, fitting_layouts,
                   layout_problems, plan_memory, plan_sampling, smallest_peak)

DEFAULT_MARGIN = 0.10
# The released Video-VAE's widths (AEConfig defaults); other widths are counted on a meta-device build.
_RELEASED_VAE_WIDTHS = (32, (4, 8, 16, 16), 128, (1, 2, 4, 4), 2, 64, 2)


class MemoryPlanError(MindSpeedMMError, ValueError):
    """Flags or config files the planner cannot plan from; the message names the flag or the file and key."""

    same_on_all_ranks = True


def build_planner_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="python -m mindspeed_mm.tools.memory_plan")
    parser.description = ("Peak device memory per rank of a StepVideo training step, and the layouts that fit; with "
                          "--inference, of sampling.")
    g = parser.add_argument_group("memory planner")
    g.add_argument("--world-size", type=int, default=None,
                   help="ranks in the job (default: --nnodes x --nproc-per-node, else TP x CP)")
    g.add_argument("--nnodes", type=int, default=None)
    g.add_argument("--nproc-per-node", type=int, default=None)
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="device memory in GB (2^30 bytes, as nvidia-smi and npu-smi count): list the layouts "
                        "that fit")
    g.add_argument("--memory-margin", type=float, default=DEFAULT_MARGIN,
                   help="fraction of the device memory kept free for what the model leaves out (allocator "
                        "fragmentation, communication buffers, workspaces); default 0.10")
    g.add_argument("--entry", dest="plan_entry", choices=("auto", "pretrain", "dpo", "inference"), default="auto",
                   help="what runs: auto = dpo when the model JSON has a 'dpo' section, inference when it has a "
                        "'pipeline_config' section and no --mm-data is given, else pretrain")
    g.add_argument("--inference", action="store_true",
                   help="plan sampling (inference_sora.py) from the inference JSON: the peak of encoding the prompts, "
                        "sampling and decoding (--use-cfg-parallel: each half of classifier-free guidance on its own "
                        "model copy)")
    g.add_argument("--num-frames", type=int, default=None, help="override the data JSON's num_frames")
    g.add_argument("--max-height", type=int, default=None, help="override the data JSON's max_height")
    g.add_argument("--max-width", type=int, default=None, help="override the data JSON's max_width")
    g.add_argument("--max-layouts", type=int, default=12, help="how many fitting layouts to list")
    g.add_argument("--node-size", type=int, default=None,
                   help="devices per node for the layout search: TP must divide it, keeping a TP group within a "
                        "node (default: --nproc-per-node when given; 0: any TP)")
    return parser


@dataclass
class PlanInputs:
    shape: DiTShape
    workload: Workload
    layout: Optional[Layout]
    training: Training
    raw: Optional[RawVideo]
    world: int
    tp_cp: Tuple[int, int]  # the flags' TP and CP
    flags_layout: Layout  # the flags' parallelism (also when the layout is invalid)
    problems: List[str]  # why the flags' own layout cannot run (then no numbers for it)
    video: Tuple[int, int, int]  # pixel frames, height, width
    vae: VAEShape
    entry: str
    notes: List[str]


def _world_size(args) -> int:
    if args.world_size is not None:
        return args.world_size
    if args.nnodes is not None or args.nproc_per_node is not None:
        return (args.nnodes or 1) * (args.nproc_per_node or 1)
    return args.tensor_model_parallel_size * args.context_parallel_size


def _checked_vae(ae, video, origins) -> VAEShape:
    """The VAE's shape (defaults without an 'ae' section), refusing a video size it does not accept."""
    vae = VAEShape(version=ae.version, frame_len=ae.frame_len) if ae is not None else VAEShape()
    problem = vae.frames_problem(video[0])
    if problem:
        raise MemoryPlanError(f"{origins[0]}: {problem}; choose a frame count the Video-VAE accepts.")
    problem = vae.size_problem(video[1], video[2])
    if problem:
        raise MemoryPlanError(f"{origins[1]} / {origins[2]}: {problem}; choose a size the Video-VAE accepts.")
    return vae


def _cp_options(args, cp: int):
    """(the sequence/CP options of the flags, the Ulysses degree), refusing a hybrid CP without a valid degree."""
    options = sequence_options(args)
    given = args.ulysses_degree_in_cp
    if args.context_parallel_algo == "hybrid_cp_algo" and (given is None or given < 1 or cp % given):
        raise MemoryPlanError(f"--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp, a divisor of "
                              f"--context-parallel-size {cp} (got {given}).")
    return options, options.ulysses_size(cp)


_SIZE_KEYS = ("num_frames", "max_height", "max_width")


def _sizes(args, fallback) -> Tuple[Tuple[int, int, int], Tuple[str, str, str]]:
    """(frames, height, width) and where each came from: --num-frames / --max-height / --max-width, else
    `fallback(i, key, flag) -> (value, origin)`."""
    values, origins = [], []
    for i, key in enumerate(_SIZE_KEYS):
        flag = "--" + key.replace("_", "-")
        value, origin = getattr(args, key), flag
        if value is None:
            value, origin = fallback(i, key, flag)
        if value <= 0:
            raise MemoryPlanError(f"{origin} {value} must be positive.")
        values.append(int(value))
        origins.append(origin)
    return tuple(values), tuple(origins)


def _video_size(args) -> Tuple[Tuple[int, int, int], Tuple[str, str, str]]:
    """(num_frames, max_height, max_width) and where each came from: the flag, else the data JSON."""
    data = args.mm.data
    pre = data.dataset_param.preprocess_parameters if data is not None else None

    def from_data(i, key, flag):
        if pre is None or getattr(pre, key) is None:
            where = (f"{args.mm_data}: dataset_param.preprocess_parameters.{key}" if data is not None
                     else "--mm-data (the dataset JSON)")
            raise MemoryPlanError(f"the video size is unknown: {where} is missing; set it or pass {flag}.")
        return getattr(pre, key), f"{args.mm_data}: dataset_param.preprocess_parameters.{key}"

    return _sizes(args, from_data)


def _token_lengths(args) -> Tuple[int, int]:
    """(step_llm, CLIP) tokens: the tokenizers' model_max_length (data JSON, else model JSON), else 320 and 77."""
    llm, clip = 320, 77
    data = args.mm.data
    tokenizers = (data.dataset_param.tokenizer_config if data is not None else None) or args.mm.model.tokenizer or []
    for tok in tokenizers:
        if tok.autotokenizer_name == "stepchat":
            llm = tok.model_max_length
        elif tok.autotokenizer_name == "BertTokenizer":
            clip = tok.model_max_length
    return llm, clip


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _vae_parameters(ae) -> Tuple[int, str]:
    widths = (ae.encoder_ch, tuple(ae.encoder_ch_mult), ae.decoder_ch, tuple(ae.decoder_ch_mult), ae.num_res_blocks,
              ae.z_channels, ae.version)
    if widths == _RELEASED_VAE_WIDTHS:
        return RELEASED_VAE_PARAMETERS, "the released Video-VAE"
    import torch

    from ...models.ae.networks import VideoDecoder, VideoEncoder

    with torch.device("meta"):
        parts = (VideoEncoder(ae.encoder_ch, ae.encoder_ch_mult, ae.num_res_blocks, ae.z_channels, ae.version),
                 VideoDecoder(ae.decoder_ch, ae.decoder_ch_mult, ae.num_res_blocks, ae.z_channels, ae.version))
    return sum(p.numel() for part in parts for p in part.parameters()), "the ae section's widths"


def _dtype_bytes(name: str) -> int:
    return 4 if name in ("fp32", "float32") else 2


def _raw_video(args, vae: VAEShape, video: Tuple[int, int, int], notes: List[str]) -> Optional[RawVideo]:
    model = args.mm.model
    if model.load_video_features and model.load_text_features:
        if model.enable_encoder_dp:
            notes.append(f"enable_encoder_dp has no effect here: {args.mm_model} loads features "
                         f"(load_video_features and load_text_features true), so no encoder runs")
        return None
    raw = RawVideo(num_frames=video[0], height=video[1], width=video[2], encoder_dp=bool(model.enable_encoder_dp),
                   global_batch=args.global_batch_size,
                   text_encoder_layerwise_offload=bool(model.text_encoder_layerwise_offload))
    fields = {}
    if not model.load_video_features:
        if model.ae is None:
            raise MemoryPlanError(f"{args.mm_model}: load_video_features is false, so the 'ae' section is needed.")
        count, source = _vae_parameters(model.ae)
        notes.append(f"Video-VAE: {count:,} parameters ({source}), {model.ae.dtype}")
        fields.update(vae=vae, vae_parameters=count, vae_bytes=_dtype_bytes(model.ae.dtype),
                      vae_tile=model.ae.tile_sample_size if model.ae.use_tiling else None)
    if not model.load_text_features:
        encoders = {enc.model_id: enc for enc in (model.text_encoder or [])}
        llm_cfg, clip_cfg = encoders.get("StepLLmModel"), encoders.get("BertModel")
        for cfg, shape_cls, name, key in ((llm_cfg, StepLLMShape, "step_llm", "step_llm"),
                                          (clip_cfg, BertShape, "HunyuanCLIP", "clip")):
            if cfg is not None:
                shape, note = _encoder_shape(cfg, shape_cls, name)
                notes.append(note)
                fields.update({key: shape, f"{key}_bytes": _dtype_bytes(cfg.dtype)})
    return replace(raw, **fields)


def _encoder_shape(cfg, shape_cls, name: str):
    """(the encoder's shape from its config.json, or the released one's; a note saying which)."""
    found = _read_json(os.path.join(cfg.from_pretrained, "config.json"))
    names = shape_cls.__dataclass_fields__
    shape = shape_cls(**{k: v for k, v in (found or {}).items() if k in names})
    source = (os.path.join(cfg.from_pretrained, "config.json") if found else
              f"the released {name} (no config.json in {cfg.from_pretrained})")
    return shape, f"{name}: {shape.parameters():,} parameters ({source}), {cfg.dtype}"


def parse_planner_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags and the JSON files they name, checked as the launchers check them."""
    parser = build_planner_parser()
    args, unknown = parser.parse_known_args(argv)
    _reject_unknown(parser, unknown)
    with collect_notices():
        args.mm = load_mm_configs(args)
        _check_era_flags(args)
    _validate_recompute(args)
    model = args.mm.model
    if model is None or model.predictor is None:
        raise MemoryPlanError("--mm-model is needed, with a 'predictor' section (the DiT's shape).")
    return args


def is_inference(args: argparse.Namespace) -> bool:
    """--inference or --entry inference; with --entry auto, an inference JSON (a pipeline_config section) given
    without --mm-data (training always has a data JSON)."""
    if args.inference or args.plan_entry == "inference":
        return True
    return args.plan_entry == "auto" and args.mm.model.pipeline_config is not None and args.mm_data is None


def plan_inputs(argv: Optional[Sequence[str]] = None,
                args: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, PlanInputs]:
    """Parse the flags and JSON files into the planner's inputs (no file the JSONs name has to exist)."""
    if args is None:
        args = parse_planner_args(argv)
    model = args.mm.model
    if args.context_parallel_algo not in CP_ALGOS:
        raise MemoryPlanError(f"--context-parallel-algo {args.context_parallel_algo}: one of {', '.join(CP_ALGOS)}.")
    if args.pipeline_model_parallel_size != 1:
        raise MemoryPlanError(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: only 1 is "
                              f"supported.")
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    micro_batch = 1 if args.micro_batch_size is None else args.micro_batch_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--context-parallel-size", cp),
                        ("--micro-batch-size", micro_batch)):
        if value < 1:
            raise MemoryPlanError(f"{flag} {value} must be at least 1.")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive.")
    if not 0 <= args.memory_margin < 1:
        raise MemoryPlanError(f"--memory-margin {args.memory_margin} must be in [0, 1).")
    if args.node_size is not None and args.node_size < 0:
        raise MemoryPlanError(f"--node-size {args.node_size} must be at least 1 (0: any TP).")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise MemoryPlanError(f"--device-memory-gb {args.device_memory_gb} must be positive.")
    world = _world_size(args)
    if world < 1:
        raise MemoryPlanError(f"--world-size {world} must be at least 1.")
    options, ulysses = _cp_options(args, cp)
    entry = ("dpo" if model.dpo is not None else "pretrain") if args.plan_entry == "auto" else args.plan_entry
    video, origins = _video_size(args)
    vae = _checked_vae(model.ae, video, origins)
    latent_h, latent_w = vae.latent_size(video[1], video[2])
    llm_tokens, clip_tokens = _token_lengths(args)
    workload = Workload(batch=micro_batch, latent_frames=vae.latent_frames(video[0]),
                        latent_height=latent_h, latent_width=latent_w, llm_tokens=llm_tokens,
                        clip_tokens=clip_tokens)
    recompute = Recompute()
    if args.recompute_granularity == "full":
        recompute = Recompute(args.recompute_method, args.recompute_num_layers)
    shape = DiTShape.from_config(model.predictor)
    problems, layout = [], None
    flags_layout = Layout(tp, cp, max(world // (tp * cp), 1), recompute, bool(args.use_distributed_optimizer),
                          sequence_parallel=options.sequence_parallel, cp_algo=options.context_parallel_algo,
                          ulysses_degree=ulysses if options.context_parallel_algo == "hybrid_cp_algo" else None)
    if world % (tp * cp):
        problems.append(f"world size {world} is not divisible by TP {tp} x CP {cp} = {tp * cp}")
        problems += layout_problems(shape, workload, flags_layout)
    else:
        layout = flags_layout
    training = Training(dtype_bytes=2 if (args.bf16 or args.fp16) else 4, dpo=entry == "dpo",
                        optimizer=args.optimizer)
    notes: List[str] = []
    if args.sequence_parallel and tp == 1:
        notes.append("--sequence-parallel has no effect with --tensor-model-parallel-size 1")
    if model.enable_encoder_dp and tp * cp == 1 and not (model.load_video_features and model.load_text_features):
        notes.append("enable_encoder_dp has no effect at TP x CP = 1 (no group to share the encoding with)")
    raw = _raw_video(args, vae, video, notes)
    return args, PlanInputs(shape=shape, workload=workload, layout=layout, training=training, raw=raw, world=world,
                            tp_cp=(tp, cp), flags_layout=flags_layout, problems=problems, video=video, vae=vae,
                            entry=entry, notes=notes)


@dataclass
class SamplingInputs:
    shape: DiTShape
    workload: Workload  # videos per batch; the DiT's batch is sampling.dit_batch
    layout: Layout
    sampling: Sampling
    guidance_scale: float
    world: int  # ranks the layout needs: TP x CP, twice that with CFG parallel
    video: Tuple[int, int, int]
    origins: Tuple[str, str, str]
    notes: List[str]
    device_memory_gb: Optional[float] = None
    memory_margin: float = DEFAULT_MARGIN


def _sampling_video(args) -> Tuple[Tuple[int, int, int], Tuple[str, str, str]]:
    """(frames, height, width) from --num-frames / --max-height / --max-width, else pipeline_config.input_size."""
    from ...config.model import PipelineConfig  # loaded with the JSON already

    pipeline = args.mm.model.pipeline_config or PipelineConfig()
    return _sizes(args, lambda i, key, flag: (pipeline.input_size[i],
                                              f"{args.mm_model}: pipeline_config.input_size[{i}]"))


def sampling_plan(args) -> Tuple[SamplingInputs, SamplingPlan]:
    """The inference JSON and the flags into the sampling plan of the flags' layout."""
    model = args.mm.model
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--context-parallel-size", cp)):
        if value < 1:
            raise MemoryPlanError(f"{flag} {value} must be at least 1.")
    if args.context_parallel_algo not in CP_ALGOS:
        raise MemoryPlanError(f"--context-parallel-algo {args.context_parallel_algo}: one of {', '.join(CP_ALGOS)}.")
    if model.ae is None:
        raise MemoryPlanError(f"{args.mm_model}: the 'ae' section is needed (the VAE decodes the videos).")
    options, ulysses = _cp_options(args, cp)
    if model.dit_layerwise_offload and tp * cp > 1:
        raise MemoryPlanError(f"{args.mm_model}: dit_layerwise_offload runs with TP = CP = 1 (inference refuses it "
                              f"at TP {tp} x CP {cp}, whose ranks already split the weights); set it to false.")
    from ...config.model import PipelineConfig

    notes: List[str] = []
    # As arguments.py: an explicit --micro-batch-size wins over the JSON's micro_batch_size.
    videos = args.micro_batch_size or model.micro_batch_size or 1
    if videos < 1:
        raise MemoryPlanError(f"--micro-batch-size {videos} must be at least 1.")
    pipeline = model.pipeline_config or PipelineConfig()
    if model.pipeline_config is None:
        notes.append(f"{args.mm_model} has no pipeline_config: its defaults are used (input_size "
                     f"{pipeline.input_size}, guidance_scale {pipeline.guidance_scale})")
    video, origins = _sampling_video(args)
    ae = model.ae
    vae = _checked_vae(ae, video, origins)
    guided = pipeline.guidance_scale > 1.0
    cfg_parallel = bool(args.use_cfg_parallel) and guided
    if args.use_cfg_parallel and not guided:
        notes.append(f"--use-cfg-parallel has no effect with guidance_scale {pipeline.guidance_scale} (no "
                     f"unconditional half)")
    dit_bytes = _dtype_bytes(model.predictor.dtype)
    if (args.bf16 or args.fp16) and dit_bytes != 2:
        notes.append(f"the DiT runs in predictor.dtype ({model.predictor.dtype}), whatever --bf16 / --fp16 say")
    vae_parameters, source = _vae_parameters(ae)
    notes.append(f"Video-VAE: {vae_parameters:,} parameters ({source}), {ae.dtype}")
    fields = {}
    encoders = {enc.model_id: enc for enc in (model.text_encoder or [])}
    for model_id, shape_cls, name, key in (("StepLLmModel", StepLLMShape, "step_llm", "step_llm"),
                                           ("BertModel", BertShape, "HunyuanCLIP", "clip")):
        cfg = encoders.get(model_id)
        if cfg is not None:
            shape, note = _encoder_shape(cfg, shape_cls, name)
            notes.append(note)
            fields.update({key: shape, f"{key}_bytes": _dtype_bytes(cfg.dtype)})
    run = Sampling(videos=videos, num_frames=video[0], height=video[1], width=video[2], dit_bytes=dit_bytes,
                   guided=guided, cfg_parallel=cfg_parallel, unload_text_encoder=bool(model.unload_text_encoder),
                   dit_layerwise_offload=bool(model.dit_layerwise_offload),
                   text_encoder_layerwise_offload=bool(model.text_encoder_layerwise_offload),
                   vae=vae, vae_parameters=vae_parameters, vae_bytes=_dtype_bytes(ae.dtype),
                   vae_tile=ae.tile_sample_size if ae.use_tiling else None, **fields)
    latent_h, latent_w = vae.latent_size(video[1], video[2])
    llm_tokens, clip_tokens = _token_lengths(args)
    workload = Workload(batch=videos, latent_frames=vae.latent_frames(video[0]), latent_height=latent_h,
                        latent_width=latent_w, llm_tokens=llm_tokens, clip_tokens=clip_tokens)
    if args.sequence_parallel and tp == 1:
        notes.append("--sequence-parallel has no effect with --tensor-model-parallel-size 1")
    layout = Layout(tp, cp, 2 if cfg_parallel else 1, sequence_parallel=options.sequence_parallel,
                    cp_algo=options.context_parallel_algo,
                    ulysses_degree=ulysses if options.context_parallel_algo == "hybrid_cp_algo" else None)
    shape = DiTShape.from_config(model.predictor)
    plan = plan_sampling(shape, workload, layout, run)
    inputs = SamplingInputs(shape=shape, workload=workload, layout=layout, sampling=run,
                            guidance_scale=pipeline.guidance_scale, world=layout.world, video=video, origins=origins,
                            notes=notes, device_memory_gb=args.device_memory_gb, memory_margin=args.memory_margin)
    return inputs, plan


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .report import format_fits, format_plan

    args = parse_planner_args(argv)
    if is_inference(args):
        from .report import format_sampling

        inputs, plan = sampling_plan(args)
        print(format_sampling(inputs, plan))
        return 0
    args, inputs = plan_inputs(args=args)
    plan = None
    if inputs.layout is not None:
        plan = plan_memory(inputs.shape, inputs.workload, inputs.layout, inputs.training, inputs.raw)
    print(format_plan(inputs, plan))
    if args.device_memory_gb is not None:
        budget = args.device_memory_gb * (1 - args.memory_margin) * GIB
        node_size = (args.node_size if args.node_size is not None else args.nproc_per_node) or None
        fits = fitting_layouts(inputs.shape, inputs.workload, inputs.world, budget, inputs.training, inputs.raw,
                               node_size)
        closest = None if fits else smallest_peak(inputs.shape, inputs.workload, inputs.world, inputs.training,
                                                  inputs.raw, node_size)
        print(format_fits(inputs, fits, args.device_memory_gb, args.memory_margin, closest, args.max_layouts,
                          node_size))
    return 0
