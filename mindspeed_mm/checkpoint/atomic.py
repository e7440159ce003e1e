"""Atomic conversion output: `AtomicDir` writes into a temporary sibling folder and renames it into place at the
end, so a failed run never leaves a half-written checkpoint where a good one was; `save_ranks` writes the rank files
and the tracker of a Megatron-layout checkpoint into it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .conversion_checks import ConversionError
from .megatron_layout import CHECKPOINT_FILENAME, RELEASE, iteration_dir_name, rank_dir_name, write_tracker


class AtomicDir:
    """Write into a temporary sibling folder, then move it onto `target` (replacing it on success only)."""

    def __init__(self, target: Path, overwrite: bool, source: Optional[Path] = None):
        self.target = Path(target).absolute()
        if source is not None:
            src = Path(source).absolute()
            if self.target == src or src in self.target.parents or self.target in src.parents:
                raise ConversionError(f"--target_path {target} overlaps --source_path {source}; "
                                      f"write the conversion to a separate folder.")
        if self.target.exists() and not self.target.is_dir():
            raise ConversionError(f"--target_path {target} exists and is a file; choose a folder path.")
        if self.target.is_dir() and any(self.target.iterdir()) and not overwrite:
            raise ConversionError(
                f"--target_path {target} exists and is not empty; pass --overwrite to replace it, or choose a new "
                f"folder. Nothing was written."
            )
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_ranks(folder: Path, ranks: Dict[Tuple[int, int], Dict[str, torch.Tensor]], pp: int, log,
                iteration=RELEASE) -> None:
    for (tp_rank, pp_rank), state in sorted(ranks.items()):
        rank_dir = folder / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank if pp > 1 else None)
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "checkpoint_version": 3.0}, rank_dir / CHECKPOINT_FILENAME)
        log(f"  wrote {rank_dir.name}/{CHECKPOINT_FILENAME}")
    write_tracker(folder, iteration)
