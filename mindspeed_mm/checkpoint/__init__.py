"""Checkpoint layouts shared by the DiT loader, the converter and the trainer."""

from .megatron_layout import (
    CHECKPOINT_FILENAME,
    RELEASE,
    TRACKER_FILENAME,
    CheckpointError,
    checkpoint_file,
    is_megatron_checkpoint,
    iteration_dir,
    iteration_dir_name,
    load_model_state_dict,
    parallel_sizes,
    rank_dir_name,
    read_tracker,
    save_model_state_dict,
    scan_rank_dirs,
    write_tracker,
)

__all__ = [
    "CHECKPOINT_FILENAME",
    "RELEASE",
    "TRACKER_FILENAME",
    "CheckpointError",
    "checkpoint_file",
    "is_megatron_checkpoint",
    "iteration_dir",
    "iteration_dir_name",
    "load_model_state_dict",
    "parallel_sizes",
    "rank_dir_name",
    "read_tracker",
    "save_model_state_dict",
    "scan_rank_dirs",
    "write_tracker",
]
