"""Reading a dataset manifest (`data.jsonl`): one JSON object per row, bad rows skipped and counted.

Accepted files: JSON Lines (one object per line; blank lines ignored), or a `.json` file holding a list of objects.
Each row needs `file` (relative to `data_folder`, or absolute) and, for raw-video datasets, `captions` (a string, or a
list of strings of which one is chosen per sample). A DPO row also has `file_rejected`, `score` and `score_rejected`.

A row with bad JSON, a missing or mistyped key, empty captions, a path outside `data_folder` or a missing file is
skipped and counted by reason with its line number, and one summary line is logged (on rank 0 only in a distributed
job), e.g. `kept 98 of 100 rows in data.jsonl: 1 bad JSON (line 7), 1 missing file (line 12)`. No usable row at all
is an error naming the file.

Paths stay inside `data_folder` (or the working directory when `data_folder` is empty): a `file` or `file_rejected`
that is absolute outside it or climbs out of it with `..` is skipped as "outside data_folder", unless the caller
allows it (`basic_parameters.allow_paths_outside_data_folder`). The check is on the path as written, after `..` is
resolved; symbolic links inside the folder are followed, so a dataset may link to videos stored elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence
from ..errors import MindSpeedMMError

logger = logging.getLogger(__name__)

DPO_KEYS = ("file_rejected", "score", "score_rejected")


class ManifestError(MindSpeedMMError, ValueError):
    """A manifest that cannot be used at all; the message names the file."""


OUTSIDE = "outside data_folder"


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ManifestRow:
    """One usable row. `path`/`path_rejected` are joined to data_folder; `captions` is a non-empty list."""

    line: int
    file: str
    path: str
    captions: List[str] = field(default_factory=list)
    file_rejected: Optional[str] = None
    path_rejected: Optional[str] = None
    score: Optional[float] = None
    score_rejected: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_dpo(self) -> bool:
        return self.file_rejected is not None


@dataclass
class Manifest:
    source: str
    rows: List[ManifestRow]
    total: int
    skipped: "OrderedDict[str, List[int]]"

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        name = os.path.basename(self.source)
        text = f"kept {len(self.rows)} of {self.total} rows in {name}"
        if self.skipped:
            parts = [f"{len(lines)} {reason} ({format_lines(lines)})" for reason, lines in self.skipped.items()]
            text += ": " + ", ".join(parts)
        return text


def format_lines(lines: Sequence[int], limit: int = 5) -> str:
    """'line 7', 'lines 2, 3', or 'lines 2, 3, 4, 5, 6, ... 3 more'."""
    shown = ", ".join(str(n) for n in lines[:limit])
    more = f", ... {len(lines) - limit} more" if len(lines) > limit else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


def _join(folder: str, name: str) -> str:
    return os.path.normpath(os.path.join(folder, name)) if folder else os.path.normpath(name)


def data_root(data_folder: str) -> str:
    """The absolute folder that rows must stay inside: `data_folder`, or the working directory when it is empty."""
    return os.path.abspath(data_folder or os.curdir)


def is_inside(path: str, root: str) -> bool:
    """True when `path` (absolute, or relative to the working directory) lies in `root` (absolute), by its text."""
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _file_key(obj: dict, key: str) -> str:
    if key not in obj:
        raise _Skip(f"missing '{key}'")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"bad '{key}'")
    return value.strip()


def _captions(obj: dict) -> List[str]:
    if "captions" not in obj:
        raise _Skip("missing 'captions'")
    value = obj["captions"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _Skip("bad 'captions'")
    kept = [c for c in value if c.strip()]
    if not kept:
        raise _Skip("empty captions")
    return kept


def _score(obj: dict, key: str) -> float:
    if key not in obj:
        raise _Skip(f"missing '{key}'")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Skip(f"bad '{key}'")
    return float(value)


def _parse_row(obj: Any, line: int, data_folder: str, require_captions: bool, check_files: bool,
               suffixes: Optional[Sequence[str]], root: Optional[str]) -> ManifestRow:
    if not isinstance(obj, dict):
        raise _Skip("not a JSON object")
    file = _file_key(obj, "file")
    captions = _captions(obj) if require_captions else []
    row = ManifestRow(line=line, file=file, path=_join(data_folder, file), captions=captions)
    if any(k in obj for k in DPO_KEYS):
        row.file_rejected = _file_key(obj, "file_rejected")
        row.path_rejected = _join(data_folder, row.file_rejected)
        row.score = _score(obj, "score")
        row.score_rejected = _score(obj, "score_rejected")
    if root is not None and not all(is_inside(p, root) for p in (row.path, row.path_rejected) if p is not None):
        raise _Skip(OUTSIDE)
    if suffixes is not None:
        for name in (row.file, row.file_rejected):
            if name is not None and not name.lower().endswith(tuple(suffixes)):
                raise _Skip(f"not a {'/'.join(suffixes)} file")
    if check_files:
        for path in (row.path, row.path_rejected):
            if path is not None and not os.path.isfile(path):
                raise _Skip("missing file")
    row.extra = {k: v for k, v in obj.items() if k not in ("file", "captions") + DPO_KEYS}
    return row


def _iter_objects(path: str):
    """Yield (line number, parsed object or _Skip) for each row of the file."""
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}: not valid JSON ({exc}); a .json manifest is one list of objects, "
                                    f"use .jsonl for one object per line.") from exc
        if not isinstance(data, list):
            raise ManifestError(f"{path}: a .json manifest must hold a list of objects, got {type(data).__name__}.")
        for i, obj in enumerate(data, start=1):
            yield i, obj
        return
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError:
                yield i, _Skip("bad JSON")


def _is_rank0() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _outside_hint(data_folder: str) -> str:
    where = f"data_folder {data_folder}" if data_folder else "the working directory (data_folder is empty)"
    return (f" Rows outside {where} are refused: set basic_parameters.data_folder to the folder that holds the "
            f"files, or set basic_parameters.allow_paths_outside_data_folder true to read them where they are.")


def read_manifest(path: str, data_folder: str = "", require_captions: bool = True, check_files: bool = True,
                  suffixes: Optional[Sequence[str]] = None, log: Optional[bool] = None,
                  allow_outside: bool = False) -> Manifest:
    """Read the usable rows of `path` (see the module docstring); `suffixes` restricts the file types (e.g. (".pt",)).

    Row numbers are 1-based line numbers for JSON Lines and 1-based list positions for a .json list. `log`: log the
    summary line; None (the default) logs it on global rank 0 only, so a job of many ranks prints it once.
    `allow_outside`: accept paths outside `data_folder` (otherwise skipped as "outside data_folder").
    """
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: the dataset manifest (basic_parameters.data_path) does not exist.")
    if data_folder and not os.path.isdir(data_folder):
        raise ManifestError(f"{data_folder}: the data folder (basic_parameters.data_folder) does not exist.")
    rows: List[ManifestRow] = []
    skipped: "OrderedDict[str, List[int]]" = OrderedDict()
    total = 0
    root = None if allow_outside else data_root(data_folder)
    for line, obj in _iter_objects(path):
        total += 1
        try:
            if isinstance(obj, _Skip):
                raise obj
            rows.append(_parse_row(obj, line, data_folder, require_captions, check_files, suffixes, root))
        except _Skip as skip:
            skipped.setdefault(skip.reason, []).append(line)
    manifest = Manifest(source=path, rows=rows, total=total, skipped=skipped)
    hint = _outside_hint(data_folder) if OUTSIDE in skipped else ""
    if log or (log is None and _is_rank0()):
        (logger.warning if skipped else logger.info)("%s", manifest.summary() + hint)
    if not rows:
        raise ManifestError(f"{path}: no usable rows ({manifest.summary()}).{hint}")
    return manifest


def choose_caption(captions: Sequence[str], seed: int, index: int, epoch: int = 0) -> str:
    """One caption of a row: the only one, or a choice that depends only on (seed, index, epoch)."""
    if len(captions) == 1:
        return captions[0]
    return random.Random(f"{seed}/{epoch}/{index}").choice(list(captions))
