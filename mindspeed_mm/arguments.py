"""Megatron-style command line for every entry point, plus the --mm-* JSON configs.

`parse_args(argv, entry)` accepts every flag the seed's launchers pass, loads
`--mm-data/--mm-model/--mm-tool` into typed configs (`args.mm.data/model/tool`), and runs
`validate_args` before any model is built. Errors name the flag or the file and key, and
say what to do. An unknown flag is an error with the closest valid flag suggested.

The guide-era launchers' Megatron GPT flags (`config/aliases.py`, `FLAGS`) are accepted: `--num-layers`,
`--hidden-size` and `--num-attention-heads` must agree with the model JSON's predictor section; the others have no
effect and are named in one notice. Notices (these, and the config files' guide-era keys) are printed once per job.
`--seed` and `--micro-batch-size`, when not given, take the inference JSON's `pipeline_config.seed` and
`micro_batch_size`; given, they win.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .config.aliases import FLAGS, add_notice, collect_notices, flag_dest, flag_given, suggest
from .config.base import ConfigError, load_config
from .config.data import MMDataConfig
from .config.model import MMModelConfig
from .config.tool import MMToolConfig
from .data.manifest import ManifestError, is_data_list, read_data_list
from .runtime.initialize import ParallelConfigError, validate_parallel_layout
from .errors import MindSpeedMMError
from .parallel.options import CP_ALGOS, SequenceParallelOptions

ENTRY_POINTS = ("pretrain", "inference", "dpo", "feature_extract", "generic")


class ArgumentError(MindSpeedMMError, ValueError):
    """A command line that cannot run; the message names the flags and the fix."""

    same_on_all_ranks = True  # checks of flags and config files, identical on every rank


@dataclass
class MMConfigs:
    data: Optional[MMDataConfig] = None
    model: Optional[MMModelConfig] = None
    tool: Optional[MMToolConfig] = None


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-algo", default="ulysses_cp_algo",
                   help="ulysses_cp_algo (all-to-all of heads), megatron_cp_algo (ring attention), hybrid_cp_algo "
                        "(Ulysses inside groups of --ulysses-degree-in-cp ranks, ring across them)")
    g.add_argument("--ulysses-degree-in-cp", type=int, default=None,
                   help="hybrid_cp_algo: the Ulysses group size; it divides --context-parallel-size")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split the tokens over the TP group outside the tensor-parallel matmuls (Megatron's)")
    g.add_argument("--use-cfg-parallel", action="store_true",
                   help="inference: the conditional and unconditional halves of classifier-free guidance on two "
                        "halves of the data-parallel ranks (xDiT's CFG parallel); needs an even DP size")
    g.add_argument("--distributed-backend", default="nccl", choices=["nccl", "hccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="accepted from older launchers; LOCAL_RANK from torchrun is what is used")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: the inference JSON's micro_batch_size, else 1")
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="constant",
                   choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Megatron DDP: reduce each gradient bucket while the backward pass goes on")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: gather updated parameters during the next forward")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false")
    g.add_argument("--seed", type=int, default=None,
                   help="default: the inference JSON's pipeline_config.seed, else 1234")
    g.add_argument("--num-workers", type=int, default=2)

    g = p.add_argument_group("precision and memory")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--allow-tf32", action="store_true")
    # fp16 loss scaling, Megatron's flags: a static --loss-scale, or the dynamic scaler's settings.
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--use-torch-compile", action="store_true",
                   help="torch.compile each DiT block (training and inference); opt-in, see docs/performance.md")

    g = p.add_argument_group("LoRA", "on when --lora-target-modules is given (MindSpeed's flags)")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="DiT layers to adapt: attn1.proj_qkv attn1.proj_out attn2.proj_q attn2.proj_kv "
                        "attn2.proj_out ff.net.0.proj ff.net.2")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-load", default=None,
                   help="a LoRA checkpoint (--save of a LoRA run) to start from or resume; --load stays the base")

    g = p.add_argument_group("DPO")
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0)
    g.add_argument("--pref-ftx", type=float, default=0.0)


def _add_checkpoint_and_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--load", default=None)
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model weights from --load and start at iteration 0")
    g.add_argument("--async-save", action="store_true",
                   help="torch_dist only: write checkpoints in background processes while training continues")
    g.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dist"],
                   help="torch: the legacy layout (one file per TP rank); torch_dist: Megatron-core distributed "
                        "checkpoints, written by every rank, resumable at another TP/DP size")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)

    g = p.add_argument_group("multimodal configs")
    g.add_argument("--mm-data", default=None, help="dataset JSON")
    g.add_argument("--mm-model", default=None, help="model JSON")
    g.add_argument("--mm-tool", default=None, help="tools JSON (profiling, feature extraction)")


def _add_era_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guide-era flags", "accepted from the user guide's launchers (docs/config.md)")
    for flag in FLAGS:
        if flag.type is None:
            g.add_argument(flag.flag, action="store_true", help=f"no effect: {flag.why}")
        else:
            what = f"must agree with predictor.{flag.checks}" if flag.checks else f"no effect: {flag.why}"
            g.add_argument(flag.flag, type=flag.type, default=None, help=what)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="mindspeed_mm (StepVideo on Megatron-core)")
    _add_parallel(parser)
    _add_training(parser)
    _add_checkpoint_and_logging(parser)
    _add_era_flags(parser)
    return parser


def _known_flags(parser: argparse.ArgumentParser) -> List[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _reject_unknown(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> None:
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if not unknown:
        return
    if not flags:
        raise ArgumentError(f"unexpected positional argument(s) {' '.join(unknown)}; every option is a --flag.")
    known = _known_flags(parser)
    lines = []
    for flag in flags:
        close = suggest(flag, known)
        lines.append(f"unknown flag {flag}" + (f"; did you mean {close}?" if close else "."))
    raise ArgumentError(" ".join(lines) + " Run with --help for the list of flags.")


def load_mm_configs(args: argparse.Namespace) -> MMConfigs:
    return MMConfigs(
        data=load_config(MMDataConfig, args.mm_data, "--mm-data") if args.mm_data else None,
        model=load_config(MMModelConfig, args.mm_model, "--mm-model") if args.mm_model else None,
        tool=load_config(MMToolConfig, args.mm_tool, "--mm-tool") if args.mm_tool else None,
    )


def parse_args(argv: Optional[Sequence[str]] = None, entry: str = "generic",
               world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse, load the JSON configs into `args.mm`, and validate; see the module docstring."""
    if entry not in ENTRY_POINTS:
        raise ValueError(f"entry {entry!r} is not one of {ENTRY_POINTS}")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    _reject_unknown(parser, unknown)
    args.entry = entry
    with collect_notices():  # printed once, after the checks pass
        args.mm = load_mm_configs(args)
        validate_args(args, world_size=world_size)
    return args


# ---- validation ---------------------------------------------------------------------------


def _world_size(world_size: Optional[int]) -> int:
    if world_size is not None:
        return world_size
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_path(path: Optional[str], where: str, fix: str) -> None:
    if path and not os.path.exists(path):
        raise ConfigError(f"{where}: '{path}' does not exist. {fix}")


def _check_config_paths(args: argparse.Namespace) -> None:
    model, data = args.mm.model, args.mm.data
    weights_fix = "Download the weights (see docs/weights.md) or correct the path."
    if model is not None:
        src = args.mm_model
        if model.predictor is not None and model.predictor.from_pretrained:
            _check_path(model.predictor.from_pretrained, f"{src}: predictor.from_pretrained", weights_fix)
        if model.ae is not None and not model.load_video_features:
            _check_path(model.ae.from_pretrained, f"{src}: ae.from_pretrained", weights_fix)
        if model.text_encoder and not model.load_text_features:
            for i, enc in enumerate(model.text_encoder):
                _check_path(enc.from_pretrained, f"{src}: text_encoder[{i}].from_pretrained", weights_fix)
        for i, tok in enumerate(model.tokenizer or []):
            _check_path(tok.from_pretrained, f"{src}: tokenizer[{i}].from_pretrained", weights_fix)
        if model.dpo is not None:
            _check_path(model.dpo.histogram_path, f"{src}: dpo.histogram_path",
                        "Run examples/stepvideo/histgram_generator.py first, or correct the path.")
            if model.dpo.reference_path:
                _check_path(model.dpo.reference_path, f"{src}: dpo.reference_path",
                            "Point it at the DiT checkpoint the DPO run started from (a Megatron checkpoint or the "
                            "official transformer/ folder).")
        if args.entry == "inference":
            _check_path(model.prompt, f"{src}: prompt", "Point it at a text file with one prompt per line.")
            _check_path(model.image, f"{src}: image", "Point it at a text file with one image path per line.")
    if data is not None:
        src = args.mm_data
        basic = data.dataset_param.basic_parameters
        _check_path(basic.data_path, f"{src}: dataset_param.basic_parameters.data_path",
                    "Point it at your data.jsonl (see docs/data.md).")
        _check_path(basic.data_folder, f"{src}: dataset_param.basic_parameters.data_folder",
                    "Point it at the folder the 'file' entries of data.jsonl are relative to.")
        if is_data_list(basic.data_path):
            _check_data_list(basic.data_path, basic.data_folder, f"{src}: dataset_param.basic_parameters")
        if data.dataset_param.dataset_type != "feature":
            for i, tok in enumerate(data.dataset_param.tokenizer_config or []):
                _check_path(tok.from_pretrained, f"{src}: dataset_param.tokenizer_config[{i}].from_pretrained",
                            "Download the weights (see docs/weights.md) or correct the path.")


def _check_data_list(path: str, data_folder: str, where: str) -> None:
    """A data.txt: well formed, without data_folder, and every folder and data.jsonl it names exists."""
    try:
        entries = read_data_list(path, data_folder)
    except ManifestError as exc:
        raise ConfigError(f"{where}.data_path: {exc}") from None
    for entry in entries:
        for what, name in (("folder", entry.folder), ("data.jsonl", entry.manifest)):
            _check_path(name, f"{where}.data_path: {path} line {entry.line}: the {what}",
                        "Correct the line: '<folder>,<folder>/data.jsonl' (feature extraction's save_path and its "
                        "data.jsonl).")


def sequence_options(args: argparse.Namespace) -> SequenceParallelOptions:
    """The sequence-parallel choices of the command line, as the runtime takes them."""
    return SequenceParallelOptions(args.context_parallel_algo, args.ulysses_degree_in_cp,
                                   bool(args.sequence_parallel) and args.tensor_model_parallel_size > 1)


def _ulysses_source(args: argparse.Namespace) -> str:
    algo = args.context_parallel_algo
    if algo == "ulysses_cp_algo":
        return "--context-parallel-algo ulysses_cp_algo: all of --context-parallel-size"
    if algo == "megatron_cp_algo":
        return "--context-parallel-algo megatron_cp_algo: none"
    return "--ulysses-degree-in-cp"


def _validate_sequence_parallel(args: argparse.Namespace, tp: int, cp: int) -> None:
    algo = args.context_parallel_algo
    if algo not in CP_ALGOS:
        raise ArgumentError(
            f"--context-parallel-algo {algo} is not supported; use ulysses_cp_algo (Ulysses, the default), "
            f"megatron_cp_algo (ring attention) or hybrid_cp_algo (Ulysses x ring, with --ulysses-degree-in-cp)."
        )
    u = args.ulysses_degree_in_cp
    if algo == "hybrid_cp_algo":
        if u is None or u < 1 or cp % u != 0:
            raise ArgumentError(
                f"--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp, a divisor of "
                f"--context-parallel-size {cp} (got {u}): CP = Ulysses degree x ring size."
            )
    elif u is not None and u != (cp if algo == "ulysses_cp_algo" else 1):
        add_notice(f"--ulysses-degree-in-cp {u} has no effect with --context-parallel-algo {algo} (it is read by "
                   f"hybrid_cp_algo only)")
    if args.sequence_parallel and tp == 1:
        add_notice("--sequence-parallel has no effect with --tensor-model-parallel-size 1")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
                            "(Megatron's rule): add them, or drop --overlap-param-gather.")


def _validate_cfg_parallel(args: argparse.Namespace, dp: int) -> None:
    if not args.use_cfg_parallel:
        return
    if args.entry != "inference":
        add_notice(f"--use-cfg-parallel has no effect for {args.entry} (an inference setting)")
        return
    if dp % 2:
        raise ArgumentError(f"--use-cfg-parallel puts the conditional and unconditional halves on two halves of the "
                            f"data-parallel ranks, but the data-parallel size is {dp} (world / (TP x CP)); launch "
                            f"twice the ranks of one model copy, or drop the flag.")
    pipeline = args.mm.model.pipeline_config if args.mm.model is not None else None
    if pipeline is not None and pipeline.guidance_scale <= 1.0:
        add_notice(f"--use-cfg-parallel has no effect with guidance_scale {pipeline.guidance_scale} (no "
                   f"unconditional half); the two halves of the ranks then make the same videos")


def _validate_inference_lora(args: argparse.Namespace) -> None:
    lora = args.mm.model.lora if args.mm.model is not None else None
    path = args.lora_load or (lora.path if lora is not None else None)
    if args.lora_target_modules is not None:
        add_notice("--lora-target-modules has no effect for inference: the layers come from the adapter's lora.json")
    if path is None:
        return
    where = "--lora-load" if args.lora_load else f"lora.path in {args.mm_model}"
    from .checkpoint.megatron_layout import CheckpointError
    from .checkpoint.stepvideo_lora import read_lora_record

    try:
        record = read_lora_record(path) if os.path.isdir(path) else None
    except CheckpointError as exc:
        raise ArgumentError(f"{where} {path}: {exc}") from None
    if record is None:
        raise ArgumentError(f"{where} {path} is not the --save folder of a LoRA run (no latest_checkpointed_iteration"
                            f".txt and lora.json there); point it at one, or merge the adapter with the converter.")


def _validate_lora(args: argparse.Namespace) -> None:
    if args.entry == "inference":
        _validate_inference_lora(args)
        return
    if args.mm.model is not None and args.mm.model.lora is not None:
        add_notice(f"{args.mm_model}: the 'lora' section has no effect for {args.entry} (an inference setting; "
                   f"training takes the --lora-* flags)")
    if args.lora_target_modules is None:
        if args.lora_load is not None:
            raise ArgumentError("--lora-load needs --lora-target-modules (the adapter's layers).")
        return
    from .models.lora import ALL_TARGETS  # light: no Megatron import

    unknown = [t for t in args.lora_target_modules if t not in ALL_TARGETS]
    if unknown:
        raise ArgumentError(f"--lora-target-modules {unknown}: not LoRA targets of the StepVideo DiT; choose from "
                            f"{' '.join(ALL_TARGETS)}.")
    if args.lora_r < 1 or args.lora_alpha <= 0 or not 0.0 <= args.lora_dropout < 1.0:
        raise ArgumentError(f"--lora-r {args.lora_r} must be at least 1, --lora-alpha {args.lora_alpha} positive and "
                            f"--lora-dropout {args.lora_dropout} in [0, 1).")
    if args.ckpt_format != "torch":
        raise ArgumentError("LoRA checkpoints are written in the legacy format for now: use --ckpt-format torch.")
    if args.lora_load is not None and not os.path.exists(args.lora_load):
        raise ArgumentError(f"--lora-load {args.lora_load} does not exist; point it at the --save folder of a LoRA "
                            f"run (it holds latest_checkpointed_iteration.txt).")


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """Cheap checks that must pass before any model is built."""
    _resolve_run_settings(args)
    tp, cp, pp = args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size
    world = _world_size(world_size)
    try:
        layout = validate_parallel_layout(world, tp, cp, pp)
    except ParallelConfigError as exc:
        raise ArgumentError(str(exc)) from None
    _validate_cfg_parallel(args, world // (tp * cp * pp))
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp not in (None, 1):
        raise ArgumentError(
            f"--virtual-pipeline-model-parallel-size {vpp} needs pipeline parallelism, which is not supported; "
            f"use 1 or drop the flag."
        )
    _validate_sequence_parallel(args, tp, cp)
    _validate_lora(args)
    if args.async_save and args.ckpt_format != "torch_dist":
        raise ArgumentError("--async-save writes distributed checkpoints in the background: add --ckpt-format "
                            "torch_dist, or drop --async-save.")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive; StepVideo is trained in bf16: keep --bf16.")
    if args.micro_batch_size < 1:
        raise ArgumentError(f"--micro-batch-size {args.micro_batch_size} must be at least 1.")
    if args.seed < 0:
        raise ArgumentError(f"--seed {args.seed} must be a non-negative integer (the launchers pass 1234).")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * layout.data
    per_step = args.micro_batch_size * layout.data
    if args.global_batch_size % per_step != 0:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {layout.data} (= world {world} / (TP {tp} x CP {cp} x "
            f"PP {pp})) = {per_step}; use a multiple of {per_step}."
        )
    args.data_parallel_size = layout.data
    args.num_micro_batches = args.global_batch_size // per_step
    _validate_recompute(args)
    model = args.mm.model
    if model is not None and model.predictor is not None:
        heads = model.predictor.num_heads
        ulysses = sequence_options(args).ulysses_size(cp)
        if heads % (tp * ulysses) != 0:
            raise ArgumentError(
                f"num_heads {heads} in {args.mm_model} (predictor.num_heads) is not divisible by "
                f"--tensor-model-parallel-size {tp} x the Ulysses degree {ulysses} "
                f"({_ulysses_source(args)}) = {tp * ulysses}: each TP rank holds num_heads/TP heads and "
                f"Ulysses splits those again. Choose TP and a Ulysses degree whose product divides {heads}, or "
                f"use ring attention (--context-parallel-algo megatron_cp_algo, or hybrid_cp_algo with "
                f"--ulysses-degree-in-cp), which does not split heads."
            )
    _check_era_flags(args)
    if args.entry in ("pretrain", "dpo"):
        if args.mm.model is None or args.mm.data is None:
            raise ArgumentError(f"{args.entry} needs --mm-model and --mm-data.")
        _check_feature_agreement(args)
        if args.train_iters is None or args.train_iters < 1:
            raise ArgumentError("--train-iters must be given and at least 1 for training.")
        if args.lr is None:
            raise ArgumentError("--lr must be given for training.")
    if args.entry == "inference" and args.mm.model is None:
        raise ArgumentError("inference needs --mm-model.")
    if args.load is not None and not os.path.exists(args.load):
        alternative = ("or drop --load to train from random weights" if args.entry in ("pretrain", "generic")
                       else "or set predictor.from_pretrained to the official transformer/ folder")
        raise ArgumentError(
            f"--load {args.load} does not exist. Point LOAD_PATH at the folder the converter wrote "
            f"(it holds latest_checkpointed_iteration.txt), {alternative}."
        )
    _check_config_paths(args)


_NOT_INFERENCE = ("pretrain", "dpo", "feature_extract")


def _resolve_run_settings(args: argparse.Namespace) -> None:
    """--seed and --micro-batch-size: the flag when given, else the inference JSON's key, else the default."""
    model = args.mm.model
    pipeline = model.pipeline_config if model else None
    for flag, dest, key, value, default in (
            ("--seed", "seed", "pipeline_config.seed", pipeline.seed if pipeline else None, 1234),
            ("--micro-batch-size", "micro_batch_size", "micro_batch_size", model.micro_batch_size if model else None,
             1)):
        given = getattr(args, dest)
        if value is not None and args.entry in _NOT_INFERENCE:
            add_notice(f"{args.mm_model}: {key} {value} has no effect for {args.entry} (an inference setting; "
                       f"{flag} sets it here)")
            value = None
        if given is None:
            setattr(args, dest, default if value is None else value)
        elif value is not None and value != given:
            add_notice(f"{flag} {given} overrides {key} {value} of {args.mm_model} (the command line wins)")


def _check_era_flags(args: argparse.Namespace) -> None:
    """The guide's Megatron GPT flags: the model's three must agree with the predictor; the rest have no effect."""
    model = args.mm.model
    predictor = model.predictor if model is not None else None
    clashes, idle = [], {}
    for flag in FLAGS:
        if not flag_given(args, flag):
            continue
        value = getattr(args, flag_dest(flag.flag))
        if flag.checks and predictor is not None:
            want = getattr(predictor, flag.checks)
            if value != want:
                what = ("num_heads x head_dim = " f"{predictor.num_heads} x {predictor.head_dim} = {want}"
                        if flag.checks == "hidden_size" else f"{flag.checks} {want}")
                clashes.append(f"{flag.flag} {value} contradicts predictor.{what}")
            continue
        idle.setdefault(flag.why, []).append(flag.flag)
    if clashes:
        raise ArgumentError(
            f"{'; '.join(clashes)} in {args.mm_model}. The DiT is built from the model JSON, so these flags must agree "
            f"with it: set them to the JSON's values, or drop them from the launcher (the guide-era launchers pass "
            f"them).")
    if idle:
        add_notice("flags with no effect here: " + "; ".join(f"{', '.join(flags)} ({why})"
                                                             for why, flags in idle.items()))


def _check_feature_agreement(args: argparse.Namespace) -> None:
    """Training on features needs load_*_features true in the model JSON; on raw videos, false."""
    model, data = args.mm.model, args.mm.data
    features = data.dataset_param.dataset_type == "feature"
    wrong = [k for k in ("load_video_features", "load_text_features") if getattr(model, k) != features]
    if wrong:
        reads = ("pre-extracted features (dataset_type \"feature\")" if features
                 else f"raw videos (dataset_type \"{data.dataset_param.dataset_type}\")")
        says = ", ".join(f"{k} {str(getattr(model, k)).lower()}" for k in wrong)
        raise ArgumentError(
            f"{args.mm_data} reads {reads} but {args.mm_model} says {says}. Set load_video_features and "
            f"load_text_features {str(features).lower()} in the model JSON, or point --mm-data at "
            f"{'raw videos' if features else 'extracted features'}.")
    _check_empty_prompt(args)


def _check_empty_prompt(args: argparse.Namespace) -> None:
    """Caption dropout on extracted features needs the empty prompt's states, written by feature extraction."""
    from .config.data import EMPTY_PROMPT_FILE, caption_dropout
    from .data.manifest import ManifestError, dataset_folders

    param = args.mm.data.dataset_param
    if not args.mm.model.load_text_features or caption_dropout(param) == 0:
        return
    basic = param.basic_parameters
    try:
        folders = dataset_folders(basic.data_path, basic.data_folder)
    except ManifestError:
        return  # the data checks report the data list itself
    for path in (os.path.join(folder, EMPTY_PROMPT_FILE) for folder in folders):
        if os.path.isfile(path):
            continue
        raise ArgumentError(
            f"{path} is missing: caption dropout (dataset_param.preprocess_parameters.cfg "
            f"{caption_dropout(param):g} in {args.mm_data}) trains some samples on the empty prompt, whose states "
            f"feature extraction writes there (the features were extracted by an older version). Re-run "
            f"feature_extraction.sh (extracted videos are kept; only the file is added), or set "
            f"preprocess_parameters.cfg to 0 to train without caption dropout (guidance then degrades).")


def _validate_recompute(args: argparse.Namespace) -> None:
    gran, method, layers = args.recompute_granularity, args.recompute_method, args.recompute_num_layers
    if gran == "selective":
        raise ArgumentError("--recompute-granularity selective is not supported for StepVideo; use full.")
    if gran is None and (method is not None or layers is not None):
        raise ArgumentError(
            "--recompute-method/--recompute-num-layers need --recompute-granularity full."
        )
    if gran == "full":
        if method is None:
            raise ArgumentError("--recompute-granularity full needs --recompute-method block or uniform.")
        if layers is None or layers < 1:
            raise ArgumentError("--recompute-granularity full needs --recompute-num-layers N (N >= 1).")
