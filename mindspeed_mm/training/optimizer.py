"""The Megatron optimizer (Adam/SGD, distributed or not, with fp16/bf16 loss scaling) and its LR / weight-decay
schedule, built from the training flags."""

from __future__ import annotations

import torch


def build_optimizer(args, ddp_model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer, loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
    )
    # Megatron exempts biases and norms from weight decay only through these overrides, applied as
    # wd_mult by the scheduler below (docs/architecture.md).
    optimizer = get_megatron_optimizer(config, [ddp_model], config_overrides=get_standard_config_overrides(config))
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * (args.lr_decay_iters or args.train_iters))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=args.lr_decay_iters or args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
