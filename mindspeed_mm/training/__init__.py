"""The training loop (pretraining and DPO), checkpointing and logging."""

from .checkpointing import load_training_state, save_checkpoint
from .train import build_model, build_optimizer, format_log_line, noise_generator, pretrain

__all__ = ["build_model", "build_optimizer", "format_log_line", "load_training_state", "noise_generator",
           "pretrain", "save_checkpoint"]
