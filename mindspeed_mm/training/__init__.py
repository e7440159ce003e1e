"""The training loop (pretraining and DPO), the tasks it trains, checkpointing and logging."""

from .builders import build_predictor, build_pretrain_model
from .checkpointing import load_training_state, recover_interrupted_save, save_checkpoint
from .metrics import format_log_line
from .optimizer import build_optimizer
from .spec import DPO, PRETRAIN, TrainSpec
from .train import noise_generator, pretrain

__all__ = ["DPO", "PRETRAIN", "TrainSpec", "build_optimizer", "build_predictor", "build_pretrain_model",
           "format_log_line", "load_training_state", "noise_generator", "pretrain", "recover_interrupted_save",
           "save_checkpoint"]
