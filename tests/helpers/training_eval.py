"""Evaluate trained checkpoints in-process, at fixed t and noise, so tests can see what training changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import torch

from mindspeed_mm.data.datasets import collate
from mindspeed_mm.data.manifest import read_manifest
from mindspeed_mm.models.diffusion import FlowMatchScheduler
from mindspeed_mm.models.predictor import StepVideoDiT
from mindspeed_mm.training.train import noise_generator


def load_dit(source, dtype: str = "fp32") -> StepVideoDiT:
    return StepVideoDiT.from_pretrained(str(source), dtype=dtype).eval()


def feature_samples(paths: dict) -> List[dict]:
    """Every sample of the feature dataset of `paths["data"]`, in manifest order (DPO rows included)."""
    from mindspeed_mm.data.datasets import FeatureDataset

    data = json.loads(Path(paths["data"]).read_text())["dataset_param"]["basic_parameters"]
    dataset = FeatureDataset(read_manifest(data["data_path"], data["data_folder"], require_captions=False,
                                           suffixes=(".pt",), log=False))
    return [dataset[i] for i in range(len(dataset))]


def mean_loss(dit: StepVideoDiT, samples: List[dict], seed: int = 99) -> float:
    """The flow-matching loss over `samples`, one per batch, each with its own fixed t and noise."""
    from mindspeed_mm.models.diffusion_loss import DiffusionLossModel

    model = DiffusionLossModel(dit, FlowMatchScheduler())
    with torch.no_grad():
        losses = [model(collate([s]), noise_generator(seed, 0, k)).mean() for k, s in enumerate(samples)]
    return torch.stack(losses).mean().item()


def dpo_metrics(actor: StepVideoDiT, reference: StepVideoDiT, samples: List[dict], seed: int, iteration: int,
                loss_beta: float = 1.0) -> dict:
    """DPO loss and margins of (actor, reference) on micro-batches of one pair each, drawn as training step
    `iteration` draws them (data parallel 1: slot k is the k-th pair)."""
    from mindspeed_mm.models.dpo_loss import DPOLossModel

    model = DPOLossModel(actor, FlowMatchScheduler(), reference, loss_beta=loss_beta)
    out = {"loss": [], "rewards/margins": []}
    with torch.no_grad():
        for k, sample in enumerate(samples):
            loss, metrics = model(collate([sample]), noise_generator(seed, iteration, k))
            out["loss"].append(loss.mean().item())
            out["rewards/margins"].append(metrics["rewards/margins"].mean().item())
    return out
