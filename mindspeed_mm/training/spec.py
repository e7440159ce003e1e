"""Train specs: what each task gives the one training loop (`training/train.py`).

A task is a `TrainSpec`: the argument parser's entry (which flags and config sections it needs) and
`build(args) -> (module, loss_fn)`. The module is what Megatron DDP wraps and the optimizer trains; it maps
(batch, generator) to its output. `loss_fn(output) -> (per-sample loss (b,), {metric name: (b,) tensor})` turns
that output into what the loop back-propagates (the mean) and logs. Pretraining (t2v and i2v) and DPO are specs
here; a new task (LoRA, a distillation) is a new spec, not a change to the loop.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

Metrics = Dict[str, torch.Tensor]
LossFn = Callable[[object], Tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class TrainSpec:
    name: str
    entry: str  # arguments.parse_args(entry=...): "pretrain" or "dpo"
    build: Callable[[argparse.Namespace], Tuple[torch.nn.Module, LossFn]]


def per_sample_loss(output: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
    """A module that returns the per-sample loss (b,) and logs nothing else."""
    return output, {}


def loss_and_metrics(output: Tuple[torch.Tensor, Metrics]) -> Tuple[torch.Tensor, Metrics]:
    """A module that returns (per-sample loss, metrics), as DPO's does (rewards, margins, accuracy)."""
    loss, metrics = output
    return loss, metrics


def _build_pretrain(args: argparse.Namespace):
    from .builders import build_pretrain_model

    return build_pretrain_model(args), per_sample_loss


def _build_dpo(args: argparse.Namespace):
    from .dpo import build_dpo_model

    return build_dpo_model(args), loss_and_metrics


PRETRAIN = TrainSpec("pretrain", "pretrain", _build_pretrain)
DPO = TrainSpec("dpo", "dpo", _build_dpo)
