"""Run an entry point's `main`, turning user errors into one clear line instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

# Every error this project raises for bad input is a ValueError (config, argument, layout, checkpoint and
# conversion errors) or a FileNotFoundError (missing weights or data); anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    try:
        return main(argv) or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
