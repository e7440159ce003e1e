"""The project's error base class: bad input that the user can fix.

Every error raised for a wrong flag, config key, path, checkpoint or data file derives from `MindSpeedMMError`, so
`mindspeed_mm.cli.run` can print it as one line (exit 2) while every other exception, a bug, keeps its traceback.
The subclasses also derive from the builtin they used to be (`ValueError`, `FileNotFoundError`), so callers that
catch those keep working.
"""

from __future__ import annotations


class MindSpeedMMError(Exception):
    """Bad input: the message names the file, key, flag or row and says what to do.

    `same_on_all_ranks`: the check reads only what every rank reads (flags, config files), so every rank of a
    torchrun job raises the same error and only rank 0 needs to print it. Errors about a rank's own files or
    data keep the default (False) and are printed by every rank that raises them, with the rank.
    """

    same_on_all_ranks = False
