"""Reading a dataset manifest (`data.jsonl`): one JSON object per row, bad rows skipped and counted.

Accepted files: JSON Lines (one object per line; blank lines ignored), or one JSON array of objects (a `.json` file,
or any manifest whose first line is `[` or that parses whole as a list, like the user guide's DPO example).

`data_path` may also name a `.txt` list (the user guide's `data.txt`): each non-blank line is
`<folder>,<manifest>` (e.g. `./sora_features/,./sora_features/data.jsonl`), and its rows are read with `<folder>` as
their data_folder. The rows of all lines are used, in order (one dataset made of several, as MindSpeed-MM did); each
file's skipped rows are counted under its own name. Relative paths in the list are relative to the working directory,
and `data_folder` must be empty (each line names its own).
Each row needs `file` (relative to `data_folder`, or absolute) and, for raw-video datasets, `captions` (a string, or a
list of strings of which one is chosen per sample). A DPO row also has `file_rejected`, `score` and `score_rejected`.

A row with bad JSON, a missing or mistyped key, empty captions, a path outside `data_folder` or a missing file is
skipped and counted by reason with its line number, and one summary line is logged (on rank 0 only in a distributed
job), e.g. `kept 98 of 100 rows in data.jsonl: 1 bad JSON (line 7), 1 missing file (line 12: data/videos/12.mp4)`:
a missing file is named by the path that was tried (data_folder joined with the row's file). No usable row at all is
an error naming the file.

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
    def __init__(self, reason: str, path: Optional[str] = None):
        super().__init__(reason)
        self.reason = reason
        self.path = path  # the file that was tried, for "missing file"


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
    source: str = ""  # the manifest file of the row (one of several when data_path is a data.txt list)

    @property
    def is_dpo(self) -> bool:
        return self.file_rejected is not None


@dataclass
class Manifest:
    source: str
    rows: List[ManifestRow]
    total: int
    skipped: "OrderedDict[str, List[int]]"
    tried: Dict[int, str] = field(default_factory=dict)  # line -> the path tried, for rows skipped as missing file
    parts: List["Manifest"] = field(default_factory=list)  # the manifests a data.txt list names
    label: str = ""  # the name shown in the summary (default: the file name)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        name = self.label or os.path.basename(self.source)
        text = f"kept {len(self.rows)} of {self.total} rows in {name}"
        if self.parts:
            return f"{text} ({'; '.join(part.summary() for part in self.parts)})"
        if self.skipped:
            parts = [f"{len(lines)} {reason} ({self._lines(lines)})" for reason, lines in self.skipped.items()]
            text += ": " + ", ".join(parts)
        return text

    def _lines(self, lines: Sequence[int], limit: int = 5) -> str:
        if not all(n in self.tried for n in lines):
            return format_lines(lines, limit)
        shown = ", ".join(f"line {n}: {self.tried[n]}" for n in lines[:limit])
        return shown + (f", ... {len(lines) - limit} more" if len(lines) > limit else "")


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
                raise _Skip("missing file", path)
    row.extra = {k: v for k, v in obj.items() if k not in ("file", "captions") + DPO_KEYS}
    return row


def _json_array(path: str, text: str) -> Optional[list]:
    """The rows of a manifest written as one JSON array, or None for JSON Lines.

    A `.json` file is always an array. Another file is one when it parses whole as a list, or when its first non-blank
    line is `[` (then a syntax error is an error naming the place, not a column of "bad JSON" rows).
    """
    array_layout = path.lower().endswith(".json") or next(
        (line.strip() for line in text.split("\n") if line.strip()), "") == "["
    if not array_layout and not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if not array_layout:
            return None  # JSON Lines whose first row is not an object: counted row by row
        raise ManifestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); a manifest "
                            f"is one JSON array of objects, or JSON Lines (one object per line).") from exc
    if isinstance(data, list):
        return data
    if path.lower().endswith(".json"):
        raise ManifestError(f"{path}: a .json manifest must hold a list of objects, got {type(data).__name__}.")
    return None


def _iter_objects(path: str):
    """Yield (row number, parsed object or _Skip) for each row of the file: JSON Lines (line numbers) or one JSON
    array (1-based positions)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    data = _json_array(path, text)
    if data is not None:
        yield from enumerate(data, start=1)
        return
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
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


@dataclass
class DataListEntry:
    line: int
    folder: str    # the data_folder of the rows of `manifest`
    manifest: str  # a data.jsonl


def is_data_list(path: str) -> bool:
    """True when `data_path` names a data.txt list of `<folder>,<manifest>` lines rather than one manifest."""
    return path.lower().endswith(".txt")


def read_data_list(path: str, data_folder: str = "") -> List[DataListEntry]:
    """The lines of a data.txt list (see the module docstring); a malformed line is an error naming it."""
    if data_folder:
        raise ManifestError(f"{path} is a data.txt list, whose lines each name their own folder, so "
                            f"basic_parameters.data_folder ({data_folder}) must be left out (or empty).")
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: the data list (basic_parameters.data_path) does not exist.")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    entries = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ManifestError(f"{path} line {number}: expected '<folder>,<folder>/data.jsonl' (the folder the rows' "
                                f"files are relative to, then their data.jsonl), got {text.strip()!r}.")
        entries.append(DataListEntry(number, parts[0], parts[1]))
    if not entries:
        raise ManifestError(f"{path}: the data list names no data.jsonl (one '<folder>,<folder>/data.jsonl' per "
                            f"line).")
    return entries


def dataset_folders(data_path: str, data_folder: str = "") -> List[str]:
    """The absolute folders of a dataset: each line's of a data.txt list, else `data_folder` (or the working
    directory). Feature extraction writes its per-dataset files (the empty prompt) there."""
    if is_data_list(data_path):
        return [os.path.abspath(entry.folder) for entry in read_data_list(data_path, data_folder)]
    return [data_root(data_folder)]


def _read_one(path: str, data_folder: str, require_captions: bool, check_files: bool,
              suffixes: Optional[Sequence[str]], allow_outside: bool) -> Manifest:
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: the dataset manifest (basic_parameters.data_path) does not exist.")
    if data_folder and not os.path.isdir(data_folder):
        raise ManifestError(f"{data_folder}: the data folder (basic_parameters.data_folder) does not exist.")
    manifest = Manifest(source=path, rows=[], total=0, skipped=OrderedDict())
    root = None if allow_outside else data_root(data_folder)
    for line, obj in _iter_objects(path):
        manifest.total += 1
        try:
            if isinstance(obj, _Skip):
                raise obj
            row = _parse_row(obj, line, data_folder, require_captions, check_files, suffixes, root)
            row.source = path
            manifest.rows.append(row)
        except _Skip as skip:
            manifest.skipped.setdefault(skip.reason, []).append(line)
            if skip.path is not None:
                manifest.tried[line] = skip.path
    return manifest


def read_manifest(path: str, data_folder: str = "", require_captions: bool = True, check_files: bool = True,
                  suffixes: Optional[Sequence[str]] = None, log: Optional[bool] = None,
                  allow_outside: bool = False) -> Manifest:
    """Read the usable rows of `path` (see the module docstring); `suffixes` restricts the file types (e.g. (".pt",)).

    Row numbers are 1-based line numbers for JSON Lines and 1-based list positions for a JSON array. `log`: log the
    summary line; None (the default) logs it on global rank 0 only, so a job of many ranks prints it once.
    `allow_outside`: accept paths outside `data_folder` (otherwise skipped as "outside data_folder"). A data.txt list
    gives one Manifest whose `parts` are the manifests it names.
    """
    read = dict(require_captions=require_captions, check_files=check_files, suffixes=suffixes,
                allow_outside=allow_outside)
    if is_data_list(path):
        parts = []
        for entry in read_data_list(path, data_folder):
            part = _read_one(entry.manifest, entry.folder, **read)
            part.label = entry.manifest
            parts.append(part)
        manifest = Manifest(source=path, rows=[r for p in parts for r in p.rows], total=sum(p.total for p in parts),
                            skipped=OrderedDict(), parts=parts)
        for part in parts:
            for reason, lines in part.skipped.items():
                manifest.skipped.setdefault(reason, []).extend(lines)
        outside = [p.source for p in parts if OUTSIDE in p.skipped]
        hint = "".join(_outside_hint(e.folder) for e in read_data_list(path) if e.manifest in outside)
    else:
        manifest = _read_one(path, data_folder, **read)
        hint = _outside_hint(data_folder) if OUTSIDE in manifest.skipped else ""
    if log or (log is None and _is_rank0()):
        (logger.warning if manifest.skipped else logger.info)("%s", manifest.summary() + hint)
    if not manifest.rows:
        raise ManifestError(f"{path}: no usable rows ({manifest.summary()}).{hint}")
    return manifest


def choose_caption(captions: Sequence[str], seed: int, index: int, epoch: int = 0) -> str:
    """One caption of a row: the only one, or a choice that depends only on (seed, index, epoch)."""
    if len(captions) == 1:
        return captions[0]
    return random.Random(f"{seed}/{epoch}/{index}").choice(list(captions))
