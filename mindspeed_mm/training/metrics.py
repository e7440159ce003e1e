"""What the training loop reports: Megatron's log line (`format_log_line`), the metrics file and TensorBoard
(`MetricsLog`), the mean of a value over the data-parallel ranks (`mean_over`) and the data rows they skipped
(`report_skipped_rows`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .builders import print_rank0 as _print


def format_log_line(iteration: int, train_iters: int, consumed: int, elapsed_ms: float, lr: float, gbs: int,
                    loss: float, grad_norm: Optional[float], skipped: int, nan_iters: int,
                    loss_scale: float = 1.0) -> str:
    """Megatron's log line: the seed's launchers read the iteration time as field 5 of a ':' split."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    norm = f"{grad_norm:.3f}" if grad_norm is not None else "nan"
    return (f" [{stamp}] iteration {iteration:8d}/{train_iters:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {elapsed_ms:.1f} | learning rate: {lr:.6E} | "
            f"global batch size: {gbs:5d} | loss: {loss:.6E} | loss scale: {loss_scale:.1f} | grad norm: {norm} | "
            f"number of skipped iterations: {skipped:3d} | number of nan iterations: {nan_iters:3d} |")


class MetricsLog:
    """Metrics as JSON lines (always) and to TensorBoard (when installed and --tensorboard-dir is set)."""

    def __init__(self, path: Path, tensorboard_dir: Optional[str]):
        self.path = path
        self.writer = None
        if dist.get_rank() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(tensorboard_dir)
            except ImportError:
                _print(f"notice: --tensorboard-dir {tensorboard_dir} ignored: tensorboard is not installed "
                       f"(metrics still go to {path}).")

    def write(self, iteration: int, metrics: dict) -> None:
        if dist.get_rank() != 0:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, iteration)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def mean_over(values: Sequence[torch.Tensor], group) -> float:
    total = torch.stack([v.float() for v in values]).mean().reshape(1)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def report_skipped_rows(local: dict, group, reported: int) -> int:
    """Print, on rank 0, the rows the data-parallel ranks skipped so far (when there are new ones); returns the
    number reported. Collective over `group`."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    merged = {}
    for part in parts:
        merged.update(part)
    if len(merged) > reported:
        from ..data import summarize_skipped

        _print(f"data: {summarize_skipped(sorted(merged.items()))}")
    return len(merged)
