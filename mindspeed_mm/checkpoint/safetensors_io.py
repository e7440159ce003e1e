"""Strict, shard-by-shard loading of safetensors checkpoints into a module built on `meta`.

The large encoders (Step-LLM is tens of GB) must not be held twice. Build the module under
`torch.device("meta")`, then `load_sharded_safetensors` checks every key and shape against
the file headers (no tensor data read), and only then reads one shard at a time, converting
each tensor to the target dtype/device and assigning it into the module.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import MindSpeedMMError
from .official_layout import WeightsNotFoundError

# What to do about a damaged file of the download, when the caller does not say.
REDOWNLOAD_FIX = ("Download the file again: an interrupted download or copy leaves it short (compare its size with "
                  "the source's).")
_TRUNCATED_SIGNS = ("incomplete metadata", "header too small", "invalid header length")


class CheckpointMismatchError(MindSpeedMMError, ValueError):
    """Checkpoint keys or shapes that do not match the model; the message lists them."""


class WeightsFileError(MindSpeedMMError, ValueError):
    """A weights, index or config file that cannot be read (truncated, corrupt, not the expected format);
    the message names the file and what to do."""


def describe_safetensors_error(exc: BaseException) -> str:
    """Why safetensors could not read a file, in words."""
    message = str(exc)
    if any(sign in message for sign in _TRUNCATED_SIGNS):
        return f"the file is truncated ({message})"
    return f"the file is damaged or is not a safetensors file ({message})"


@contextmanager
def open_safetensors(path, what: str, fix: str = REDOWNLOAD_FIX, device: str = "cpu") -> Iterator[Any]:
    """`safe_open(path)`; a file that safetensors cannot read (truncated, corrupt, not safetensors), on opening
    or while reading tensors in the block, raises WeightsFileError naming `what`, the file and `fix`."""
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            yield handle
    except SafetensorError as exc:
        raise WeightsFileError(f"{what}: cannot read '{path}': {describe_safetensors_error(exc)}. {fix}") from exc


def read_json_file(path, what: str, fix: str = REDOWNLOAD_FIX) -> Any:
    """The JSON value in `path`; a file that is not valid UTF-8 JSON raises WeightsFileError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise WeightsFileError(f"{what}: '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                               f"{exc.colno}); it is truncated or damaged. {fix}") from exc
    except UnicodeDecodeError as exc:
        raise WeightsFileError(f"{what}: '{path}' is not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                               f"it is damaged or not the JSON file expected there. {fix}") from exc


def shard_map(folder: str, index_name: str, single_name: str, what: str) -> Dict[str, str]:
    """{checkpoint key: shard path} from `<index_name>` or a single `<single_name>`."""
    index_path = os.path.join(folder, index_name)
    single_path = os.path.join(folder, single_name)
    if os.path.isfile(index_path):
        index = read_json_file(index_path, what)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsFileError(f"{what}: {index_path} has no 'weight_map'; it is not a safetensors index. "
                                   f"{REDOWNLOAD_FIX}")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
            raise WeightsNotFoundError(
                f"{what}: {index_path} names shard(s) that are not in {folder}: {', '.join(missing)}. "
                f"Finish the download (all shards listed in the index are needed)."
            )
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    if os.path.isfile(single_path):
        with open_safetensors(single_path, what) as handle:
            return {key: single_path for key in handle.keys()}
    raise WeightsNotFoundError(
        f"{what}: '{folder}' has neither {index_name} nor {single_name}; point from_pretrained at the folder "
        f"that holds the safetensors weights."
    )


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys_and_shapes(expected: Dict[str, torch.Size], found: Dict[str, torch.Size], source: str) -> None:
    """Raise CheckpointMismatchError listing missing keys, unexpected keys and shape mismatches."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    shapes = [f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
              for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    parts = [f"checkpoint {source} does not match the model:"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:20]))
    parts.append("Check that the config (layers, widths, heads) matches these weights.")
    raise CheckpointMismatchError("\n".join(parts))


def load_sharded_safetensors(
    module: nn.Module,
    key_to_file: Dict[str, str],
    source: str,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    rename: Optional[Callable[[str], str]] = None,
    what: Optional[str] = None,
) -> None:
    """Strictly load `key_to_file` into `module` (which may live on `meta`), one shard at a time.
    `what` names the model in errors about unreadable files (default: `source`)."""
    what = what or source
    rename = rename or (lambda k: k)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    by_file: Dict[str, list] = defaultdict(list)
    found: Dict[str, torch.Size] = {}
    for key, path in key_to_file.items():
        by_file[path].append(key)
    for path, keys in by_file.items():
        with open_safetensors(path, what) as handle:
            absent = set(keys) - set(handle.keys())
            if absent:
                raise WeightsFileError(
                    f"{what}: the index maps {_format_keys(absent)} to '{path}', which does not hold them; the index "
                    f"and its shards come from different downloads. {REDOWNLOAD_FIX}"
                )
            for key in keys:
                found[rename(key)] = torch.Size(handle.get_slice(key).get_shape())
    check_keys_and_shapes(expected, found, source)
    for path, keys in by_file.items():
        shard = {}
        with open_safetensors(path, what) as handle:
            for key in keys:
                tensor = handle.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if device is not None:
                    tensor = tensor.to(device)
                shard[rename(key)] = tensor
        module.load_state_dict(shard, strict=False, assign=True)
        del shard
