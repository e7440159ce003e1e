"""Run an entry point's `main`, turning user errors into one clear line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

from .errors import MindSpeedMMError


def _launch_rank() -> int:
    """This process's rank as the launcher (torchrun) gives it; 0 for a plain `python` start."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def notice(message: str) -> None:
    """Print `notice: <message>` (one line, to stderr) on the launch rank 0 only, so a job prints it once."""
    if _launch_rank() == 0:
        print(f"notice: {message}", file=sys.stderr, flush=True)


def configure_logging(rank: Optional[int] = None) -> None:
    """INFO and above from the project's loggers on rank 0, warnings and errors on the other ranks.

    Leaves logging alone when the application has configured it already (handlers on the root logger).
    """
    if logging.getLogger().handlers:
        return
    rank = _launch_rank() if rank is None else rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=("" if rank == 0 else f"[rank {rank}] ") + "%(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """`main(argv)` with logging configured; a `MindSpeedMMError` (bad input: config, flag, path, checkpoint,
    data) is printed as one line and exits 2, once per job when every rank raises it. Any other exception is a
    bug and keeps its traceback."""
    configure_logging()
    try:
        return main(argv) or 0
    except MindSpeedMMError as exc:
        rank = _launch_rank()
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif not exc.same_on_all_ranks:
            print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
