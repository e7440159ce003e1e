"""What the training loop trains: the DiT from its checkpoint, the frozen encoders, and the loss module.

A task is a function `build(args) -> module` whose module maps (batch, generator) to per-sample losses, or to
(losses, {metric name: per-sample tensor}). `build_pretrain_model` is pretraining (t2v and i2v);
`mindspeed_mm.training.dpo.build_dpo_model` is DPO. The models themselves never read flags: everything they need
is passed to their constructors here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..arguments import ArgumentError


def print_rank0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def params_dtype(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def load_dit(args, source: Optional[str], recompute: bool = True, copy_of=None):
    """The DiT in the flags' precision from `source` (--load, a from_pretrained path), or announced random weights.
    `copy_of`: a DiT already loaded from `source` with these flags, copied instead of reading `source` again."""
    from ..models.predictor import StepVideoDiT

    cfg = replace(args.mm.model.predictor, dtype=params_dtype(args))
    if copy_of is not None:
        dit = StepVideoDiT.from_model(copy_of)
    elif source:
        dit = StepVideoDiT.from_pretrained(source, replace(cfg, from_pretrained=None))
    else:
        print_rank0("WARNING: neither --load nor predictor.from_pretrained is set: the DiT starts from RANDOM "
                    "weights. Set LOAD_PATH (a converted checkpoint) to fine-tune the released model.")
        dit = StepVideoDiT.build(cfg)
    if recompute:
        dit.configure_recompute(args.recompute_granularity, args.recompute_method, args.recompute_num_layers)
    if getattr(args, "use_torch_compile", False):
        dit.compile_blocks()
    return dit


def build_predictor(args, copy_of=None):
    """The trained DiT: from --load, else predictor.from_pretrained, else (announced) random weights.
    `copy_of`: a DiT already loaded from that same source (DPO's reference), whose weights are copied."""
    source = args.load or args.mm.model.predictor.from_pretrained
    if source:
        print_rank0(f"copying the DiT from the DPO reference, which was loaded from {source}" if copy_of is not None
                    else f"loading the DiT from {source}")
    dit = load_dit(args, source, copy_of=copy_of).train()
    if getattr(args, "lora_target_modules", None):  # flags from parse_args; callers may pass a partial namespace
        add_lora(args, dit, source)
    return dit


LORA_RECORD = "lora"


def add_lora(args, dit, base: Optional[str]) -> None:
    """LoRA on the loaded DiT (base frozen), its adapters from --lora-load when given, and the record saved with
    every checkpoint (`lora.json`: the adapter's settings and the base it was trained on)."""
    from ..checkpoint.megatron_layout import CheckpointError, load_model_state_dict, read_tracker
    from ..models.lora import apply_lora, lora_state_dict

    targets = apply_lora(dit, args.lora_target_modules, r=args.lora_r, alpha=args.lora_alpha,
                         dropout=args.lora_dropout)
    expected = set(lora_state_dict(dit))
    trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    print_rank0(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {len(targets)} layers "
                f"({' '.join(args.lora_target_modules)}): {trainable:,} trainable parameters on this rank, the base "
                f"frozen")
    predictor = args.mm.model.predictor
    dit.lora_record = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                       "target_modules": list(args.lora_target_modules),
                       "base": os.path.abspath(base) if base else None,
                       "num_heads": predictor.num_heads, "head_dim": predictor.head_dim}
    if args.lora_load is None:
        return
    state = dit.parallel
    tp_rank, tp = (state.tp_rank, state.tp) if state.initialized else (0, 1)
    adapters, path = load_model_state_dict(args.lora_load, tp_rank, tp, read_tracker(args.lora_load))
    if set(adapters) != expected:
        missing, unexpected = sorted(expected - set(adapters))[:4], sorted(set(adapters) - expected)[:4]
        raise CheckpointError(f"{path}: not the adapter of these LoRA settings (--lora-target-modules, TP {tp}): "
                              f"missing {missing}, unexpected {unexpected}.")
    own = dict(dit.named_parameters())
    for key, tensor in adapters.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{path}: {key} is {tuple(tensor.shape)}, this run's adapter {tuple(own[key].shape)}"
                                  f" (--lora-r {args.lora_r}); use the r it was trained with.")
        with torch.no_grad():
            own[key].copy_(tensor)
    print_rank0(f"LoRA adapters loaded from {args.lora_load}")


def build_encoders(args) -> Tuple[object, object]:
    """(VAE, text encoder), each None when the data hold its output already (load_*_features true)."""
    from ..models.ae import StepVideoVAE
    from ..models.text_encoder import StepVideoTextEncoder
    from ..runtime import current_device

    model_cfg = args.mm.model
    vae = encoder = None
    if not model_cfg.load_video_features:
        if model_cfg.ae is None:
            raise ArgumentError(f"{args.mm_model}: load_video_features is false, so the 'ae' section is needed.")
        vae = StepVideoVAE.from_config(model_cfg.ae, device=current_device())
        vae.decode_group = None
    if not model_cfg.load_text_features:
        tokenizers = (args.mm.data.dataset_param.tokenizer_config if args.mm.data is not None else None) \
            or model_cfg.tokenizer
        if not model_cfg.text_encoder or not tokenizers:
            raise ArgumentError(f"{args.mm_model}: load_text_features is false, so 'text_encoder' (model JSON) and "
                                f"the tokenizers (dataset_param.tokenizer_config) are needed.")
        encoder = StepVideoTextEncoder.from_configs(model_cfg.text_encoder, tokenizers, device=current_device(),
                                                    layerwise_offload=model_cfg.text_encoder_layerwise_offload)
    return vae, encoder


def encoder_dp_options(args, vae, encoder) -> dict:
    """The model keywords of `enable_encoder_dp`: {enable_encoder_dp, encoder_group (the tensor x context parallel
    group)} when the frozen encoders run during training (raw videos or token ids) and that group has more than one
    rank; else {} and, when the key is set, a notice that it has no effect."""
    if not args.mm.model.enable_encoder_dp:
        return {}
    from megatron.core import parallel_state as ps

    from ..config.aliases import add_notice

    if vae is None and encoder is None:
        add_notice(f"{args.mm_model}: enable_encoder_dp has no effect with load_video_features and "
                   f"load_text_features true (extracted features: nothing is encoded during training)")
        return {}
    group = ps.get_tensor_and_context_parallel_group()
    if dist.get_world_size(group) == 1:
        add_notice(f"{args.mm_model}: enable_encoder_dp has no effect with tensor x context parallel size 1 (no "
                   f"ranks share this rank's micro-batches)")
        return {}
    return {"enable_encoder_dp": True, "encoder_group": group}


def caption_dropout_options(args, encoder) -> dict:
    """{caption_dropout, empty_prompt} for the loss model: p from the data JSON (preprocess_parameters.cfg); the
    empty prompt's states from the features' empty_prompt.pt, or encoded by the text encoder when it runs here."""
    from ..config.data import EMPTY_PROMPT_FILE, caption_dropout

    param = args.mm.data.dataset_param
    p = caption_dropout(param)
    if p == 0:
        return {}
    if encoder is not None:
        return {"caption_dropout": p}
    from ..checkpoint.megatron_layout import torch_load
    from ..data.manifest import dataset_folders

    folder = dataset_folders(param.basic_parameters.data_path, param.basic_parameters.data_folder)[0]
    path = os.path.join(folder, EMPTY_PROMPT_FILE)  # every folder's is the same prompt through the same encoders
    payload = torch_load(path, fix="Re-run feature extraction to write it again.")
    print_rank0(f"caption dropout {p:g}: a sample is trained on the empty prompt ({path}) with that probability")
    return {"caption_dropout": p, "empty_prompt": (list(payload["prompt_ids"]), list(payload["prompt_mask"]))}


def check_training_sections(args) -> None:
    model_cfg = args.mm.model
    if model_cfg.predictor is None or model_cfg.diffusion is None:
        raise ArgumentError(f"{args.mm_model} needs the 'predictor' and 'diffusion' sections for training.")


def build_pretrain_model(args):
    """DiffusionLossModel: the DiT under flow matching, with the frozen encoders when the data are raw videos."""
    from ..models.diffusion import FlowMatchScheduler
    from ..models.diffusion_loss import DiffusionLossModel

    check_training_sections(args)
    model_cfg = args.mm.model
    vae, encoder = build_encoders(args)
    dit = build_predictor(args)
    model = DiffusionLossModel(dit, FlowMatchScheduler.from_config(model_cfg.diffusion), vae=vae, text_encoder=encoder,
                               i2v=model_cfg.predictor.use_additional_conditions,
                               **encoder_dp_options(args, vae, encoder), **caption_dropout_options(args, encoder))
    if getattr(dit, "lora_record", None):
        model.checkpoint_records[LORA_RECORD] = dit.lora_record
    return model
