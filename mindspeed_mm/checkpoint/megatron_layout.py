"""The Megatron legacy checkpoint layout (as the seed and MindSpeed-MM write it), strictly.

    <dir>/latest_checkpointed_iteration.txt      "release" or an iteration number
    <dir>/release/ or <dir>/iter_0000100/
        mp_rank_00/model_optim_rng.pt            TP rank 00 (no pipeline parallel)
        mp_rank_00_001/model_optim_rng.pt        TP rank 00, PP rank 001 (pipeline parallel)

Each file is `torch.save({"model": state_dict, ...})`. Reading is strict: a missing tracker,
a tracker naming a missing directory, or rank directories that do not match the requested
TP size are errors that say what was expected. Megatron itself starts from random weights
when the tracker is missing; we never do that silently.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from ..errors import MindSpeedMMError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
RELEASE = "release"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")

Iteration = Union[int, str]  # an iteration number or "release"


class CheckpointError(MindSpeedMMError, ValueError):
    """A checkpoint folder that cannot be read as asked; the message names the path and the fix."""


def tracker_path(directory) -> Path:
    return Path(directory) / TRACKER_FILENAME


def is_megatron_checkpoint(directory) -> bool:
    """True when `directory` looks like a Megatron checkpoint (tracker or iteration folders)."""
    d = Path(directory)
    if tracker_path(d).is_file() or (d / RELEASE).is_dir():
        return True
    return d.is_dir() and any(p.is_dir() and re.match(r"^iter_\d{7}$", p.name) for p in d.iterdir())


def read_tracker(directory) -> Iteration:
    """The iteration the tracker names: an int, or "release"."""
    path = tracker_path(directory)
    if not path.is_file():
        found = sorted(p.name for p in Path(directory).iterdir())[:10] if Path(directory).is_dir() else None
        where = f"the folder holds {found}" if found is not None else "the folder does not exist"
        raise CheckpointError(
            f"no checkpoint tracker at {path} ({where}). A Megatron-layout checkpoint needs "
            f"{TRACKER_FILENAME} containing 'release' or an iteration number, beside release/ or "
            f"iter_XXXXXXX/ folders. Check --load / LOAD_PATH, or convert the official weights first "
            f"(examples/stepvideo/convert_ckpt_to_mm.py). We never start from random weights silently."
        )
    text = path.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"{path} contains {text[:40]!r}; it must hold 'release' or a non-negative iteration number."
        ) from None
    if iteration < 0:
        raise CheckpointError(f"{path} names iteration {iteration}; it must be 'release' or >= 0.")
    return iteration


def write_tracker(directory, iteration: Iteration) -> Path:
    path = tracker_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RELEASE if iteration == RELEASE else str(int(iteration)))
    return path


def iteration_dir_name(iteration: Iteration) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: Optional[int] = None) -> str:
    """mp_rank_XX without pipeline parallel, mp_rank_XX_YYY with it (pp_rank given)."""
    return f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iteration_dir(directory, iteration: Optional[Iteration] = None) -> Path:
    """The release/ or iter_XXXXXXX/ folder (the tracker's when `iteration` is None)."""
    if iteration is None:
        iteration = read_tracker(directory)
    path = Path(directory) / iteration_dir_name(iteration)
    if not path.is_dir():
        raise CheckpointError(
            f"{tracker_path(directory)} names {iteration!r}, but {path} does not exist. The checkpoint is "
            f"incomplete or the tracker is stale; point --load at a complete checkpoint or fix the tracker."
        )
    return path


def scan_rank_dirs(iter_dir) -> Dict[Tuple[int, Optional[int]], Path]:
    """{(tp_rank, pp_rank or None): path} of the mp_rank_* folders in an iteration folder."""
    found = {}
    for p in Path(iter_dir).iterdir():
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            found[(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))] = p
    return found


def parallel_sizes(iter_dir) -> Tuple[int, int]:
    """(TP size, PP size) of the checkpoint in `iter_dir`, checking that no rank is missing."""
    ranks = scan_rank_dirs(iter_dir)
    if not ranks:
        raise CheckpointError(
            f"{iter_dir} has no mp_rank_XX folders; expected mp_rank_00/{CHECKPOINT_FILENAME} and one "
            f"folder per tensor-parallel rank."
        )
    tp = 1 + max(t for t, _ in ranks)
    pps = {p for _, p in ranks}
    if None in pps and len(pps) > 1:
        raise CheckpointError(f"{iter_dir} mixes mp_rank_XX and mp_rank_XX_YYY folders; it is not one checkpoint.")
    pp = 1 if None in pps else 1 + max(pps)
    expected = {(t, None) for t in range(tp)} if None in pps else {(t, q) for t in range(tp) for q in range(pp)}
    missing = sorted(expected - set(ranks), key=str)
    if missing:
        names = [rank_dir_name(t, q) for t, q in missing]
        raise CheckpointError(f"{iter_dir} is incomplete: rank folder(s) {names} are missing.")
    return tp, pp


def checkpoint_file(directory, tp_rank: int, tp_size: int, iteration: Optional[Iteration] = None) -> Path:
    """This TP rank's model_optim_rng.pt, for a checkpoint without pipeline parallel."""
    iter_dir = iteration_dir(directory, iteration)
    ckpt_tp, ckpt_pp = parallel_sizes(iter_dir)
    if ckpt_pp != 1:
        raise CheckpointError(
            f"{iter_dir} was saved with pipeline parallel size {ckpt_pp} (mp_rank_XX_YYY folders); this run "
            f"uses --pipeline-model-parallel-size 1. Merge the pipeline stages with the checkpoint converter first."
        )
    if ckpt_tp != tp_size:
        raise CheckpointError(
            f"{iter_dir} holds a checkpoint with tensor parallel size {ckpt_tp} (mp_rank_00..mp_rank_"
            f"{ckpt_tp - 1:02d}), but this run uses --tensor-model-parallel-size {tp_size}. Launch with "
            f"--tensor-model-parallel-size {ckpt_tp}, or re-split the checkpoint to TP {tp_size} with the "
            f"checkpoint converter."
        )
    rank_dir = scan_rank_dirs(iter_dir)[(tp_rank, None)]
    path = rank_dir / CHECKPOINT_FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the rank folder {rank_dir} is empty or incomplete.")
    return path


def _basic_safe_globals() -> list:
    import argparse
    import io
    import pathlib
    import types

    import numpy as np

    names = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO, np.ndarray, np.dtype]
    try:  # numpy >= 2 moved the pickling helper
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    names.append(_reconstruct)
    names.extend(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))
    return names


# What to do about a model_optim_rng.pt that cannot be read, when the caller does not say.
RELOAD_FIX = ("Copy the checkpoint again from where it was saved, re-run examples/stepvideo/convert_ckpt_to_mm.py "
              "if it came from the converter, or point --load at another complete iteration.")
_FILE_ERROR_SIGNS = ("PytorchStreamReader", "unexpected EOF", "corrupted", "zip archive", "invalid load key")


def describe_torch_load_error(exc: BaseException) -> Optional[str]:
    """Why `torch.load` failed, in words, when the cause is the file (refused pickle, truncated or corrupt file);
    None for any other exception, which is then not a user error."""
    import pickle

    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in message:
        found = re.search(r"GLOBAL ([\w.]+)", message)
        what = f"an object of type {found.group(1)}" if found else "a non-tensor object"
        return (f"its pickle holds {what}, which torch.load(weights_only=True) refuses because unpickling it could "
                f"run arbitrary code. Only load checkpoints you trust: neither this project's tools nor the official "
                f"release write such objects, so another tool wrote this file or it was altered. If you trust its "
                f"source, load it once with torch.load(path, weights_only=False) in your own script and torch.save "
                f"only its tensors; otherwise replace it")
    if isinstance(exc, EOFError):
        return "the file is empty or truncated (an interrupted save or copy)"
    if isinstance(exc, pickle.UnpicklingError):
        first = message.splitlines()[0] if message else "unpickling failed"
        return f"it is not a torch.save file, or it is damaged ({first})"
    if isinstance(exc, RuntimeError) and any(sign in message for sign in _FILE_ERROR_SIGNS):
        first = message.split(". ")[0]
        return f"the file is truncated or damaged ({first}), e.g. by an interrupted save or copy"
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:  # torch's zip reader on a cut-off file
        return f"the file is truncated or damaged (reading it as a zip archive failed: {exc}), e.g. by an " \
               f"interrupted save or copy"
    if isinstance(exc, OSError):
        return f"the file cannot be read ({exc})"
    return None


@contextmanager
def checkpoint_load_errors(path, fix: str = RELOAD_FIX) -> Iterator[None]:
    """Turn a `torch.load` failure caused by the file at `path` (a pickle that weights_only refuses, a truncated
    or corrupt file) into a CheckpointError naming `path`, its cause and `fix`; any other exception passes.

        with checkpoint_load_errors(dist_path, fix="Resume with --no-load-optim ..."):
            optimizer.load_parameter_state(str(dist_path))   # Megatron's own torch.load
    """
    import pickle

    try:
        yield
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as exc:
        problem = describe_torch_load_error(exc)
        if problem is None:
            raise
        raise CheckpointError(f"cannot load {path}: {problem}. {fix}") from exc


def torch_load(path, fix: str = RELOAD_FIX, mmap: bool = False) -> dict:
    """torch.load with weights_only=True, allowing the plain types that Megatron-style checkpoints carry
    (numpy RNG states, argparse.Namespace args) and, when needed, Megatron-core's own safe classes.
    A file that cannot be read raises CheckpointError naming it, the cause and `fix`.

    `mmap=True` maps the file instead of reading it: only the pickle is read now, and each tensor's bytes when the
    tensor is first used (so a caller that uses part of the file reads only that part; `file_pages.FilePages`
    gives the pages back after a copy). The tensors are then views of a private mapping: writing to one changes
    this process's copy only, never the file. A file in torch's old non-zip format cannot be mapped and is read
    whole, as without `mmap`."""
    import pickle

    def load(extra_globals=()):
        with torch.serialization.safe_globals(_basic_safe_globals() + list(extra_globals)):
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap can only be used" not in str(exc):
                        raise
            return torch.load(path, map_location="cpu", weights_only=True)

    with checkpoint_load_errors(path, fix):
        try:
            return load()
        except pickle.UnpicklingError:
            from megatron.core.safe_globals import SAFE_GLOBALS  # enums and configs saved by Megatron-LM

            return load(SAFE_GLOBALS)


def load_model_state_dict(directory, tp_rank: int = 0, tp_size: int = 1, iteration: Optional[Iteration] = None,
                          mmap: bool = True) -> Tuple[Dict[str, torch.Tensor], Path]:
    """(the "model" state dict of this TP rank, the file it came from).

    By default the file is memory-mapped (see `torch_load`): the tensors are read when used, and the optimizer
    state beside them in a training checkpoint is never read at all."""
    path = checkpoint_file(directory, tp_rank, tp_size, iteration)
    payload = torch_load(path, mmap=mmap)
    if not isinstance(payload, dict) or "model" not in payload:
        keys = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} has no 'model' entry (found {keys}); expected torch.save({{'model': state_dict}}). "
            f"Virtual-pipeline checkpoints ('model0', ...) are not supported."
        )
    return payload["model"], path


def save_model_state_dict(directory, state_dict, iteration: Iteration = RELEASE, tp_rank: int = 0,
                          pp_rank: Optional[int] = None, extra: Optional[dict] = None,
                          update_tracker: bool = True) -> Path:
    """Write {"model": state_dict, **extra} for one rank, and (by default) the tracker."""
    rank_dir = Path(directory) / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank)
    rank_dir.mkdir(parents=True, exist_ok=True)
    path = rank_dir / CHECKPOINT_FILENAME
    payload = {"model": dict(state_dict)}
    payload.update(extra or {})
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    if update_tracker:
        write_tracker(directory, iteration)
    return path
