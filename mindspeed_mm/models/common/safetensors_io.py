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
from typing import Callable, Dict, Iterable, Optional

import torch
from safetensors import safe_open
from torch import nn
from ...errors import MindSpeedMMError


class CheckpointMismatchError(MindSpeedMMError, ValueError):
    """Checkpoint keys or shapes that do not match the model; the message lists them."""


def shard_map(folder: str, index_name: str, single_name: str, what: str) -> Dict[str, str]:
    """{checkpoint key: shard path} from `<index_name>` or a single `<single_name>`."""
    index_path = os.path.join(folder, index_name)
    single_path = os.path.join(folder, single_name)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointMismatchError(f"{what}: {index_path} has no 'weight_map'.")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(folder, f))})
        if missing:
            raise FileNotFoundError(
                f"{what}: {index_path} names shard(s) that are not in {folder}: {', '.join(missing)}. "
                f"Finish the download (all shards listed in the index are needed)."
            )
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    if os.path.isfile(single_path):
        with safe_open(single_path, framework="pt") as handle:
            return {key: single_path for key in handle.keys()}
    raise FileNotFoundError(
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
) -> None:
    """Strictly load `key_to_file` into `module` (which may live on `meta`), one shard at a time."""
    rename = rename or (lambda k: k)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    by_file: Dict[str, list] = defaultdict(list)
    found: Dict[str, torch.Size] = {}
    for key, path in key_to_file.items():
        by_file[path].append(key)
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for key in keys:
                found[rename(key)] = torch.Size(handle.get_slice(key).get_shape())
    check_keys_and_shapes(expected, found, source)
    for path, keys in by_file.items():
        shard = {}
        with safe_open(path, framework="pt") as handle:
            for key in keys:
                tensor = handle.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if device is not None:
                    tensor = tensor.to(device)
                shard[rename(key)] = tensor
        module.load_state_dict(shard, strict=False, assign=True)
        del shard
