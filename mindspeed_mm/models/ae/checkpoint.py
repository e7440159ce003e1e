"""The official VAE checkpoint format: file lookup, the one key rename, strict checks, config inference.

The released files are single safetensors files, `vae/vae_v2.safetensors` (version 2) and
`vae/vae.safetensors` (version 1), holding the module `state_dict()` under the official names,
except that the decoder's last convolution is stored as `decoder.conv_out.{weight,bias}`;
the module calls it `decoder.conv_out.conv.{weight,bias}`. They carry no config, so the
widths come from the caller; when they do not match, the error says what the file looks like.
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from ...errors import MindSpeedMMError
from ...checkpoint.official_layout import WeightsNotFoundError

WEIGHT_FILES = {2: "vae_v2.safetensors", 1: "vae.safetensors"}
_DISK_PREFIX = "decoder.conv_out."
_MODULE_PREFIX = "decoder.conv_out.conv."
_LIST_LIMIT = 12


class VAEWeightsError(MindSpeedMMError, ValueError):
    """A VAE weights file whose keys or shapes do not match the model; the message names file and keys."""


def disk_to_module_key(key: str) -> str:
    """`decoder.conv_out.X` -> `decoder.conv_out.conv.X`, as the official loader renames; others unchanged.

    Like the official loader, the rename is unconditional: a file that already stores
    `decoder.conv_out.conv.*` (module names) is not in the official layout and fails the strict check.
    """
    if key.startswith(_DISK_PREFIX):
        return _MODULE_PREFIX + key[len(_DISK_PREFIX):]
    return key


def module_to_disk_key(key: str) -> str:
    """Inverse of `disk_to_module_key`: the name a module key has in an official file."""
    if key.startswith(_MODULE_PREFIX):
        return _DISK_PREFIX + key[len(_MODULE_PREFIX):]
    return key


def resolve_weights_file(path: str, version: int) -> str:
    """`path` itself if it is a file; for a folder, its `vae_v2.safetensors` / `vae.safetensors` by version."""
    if not path or not os.path.exists(path):
        raise WeightsNotFoundError(
            f"StepVideo VAE: weights '{path}' (from_pretrained) do not exist. Point from_pretrained at the "
            f"official vae/{WEIGHT_FILES[2]} (version 2) or vae/{WEIGHT_FILES[1]} (version 1), or at the vae/ "
            f"folder that holds them."
        )
    if os.path.isdir(path):
        file = os.path.join(path, WEIGHT_FILES[version])
        if not os.path.isfile(file):
            present = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            raise WeightsNotFoundError(
                f"StepVideo VAE: folder '{path}' has no {WEIGHT_FILES[version]} (version {version}); it holds "
                f"{present or 'no .safetensors file'}. Version 2 uses {WEIGHT_FILES[2]}, version 1 uses "
                f"{WEIGHT_FILES[1]}: set 'version' to match, or point from_pretrained at the file."
            )
        return file
    return path


def read_shapes(file: str) -> Dict[str, Tuple[int, ...]]:
    """{module key: shape} from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(file, framework="pt") as handle:
            return {disk_to_module_key(k): tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise VAEWeightsError(f"StepVideo VAE: cannot read '{file}' as safetensors: {exc}") from exc


def read_tensors(file: str, dtype: torch.dtype, device: torch.device) -> Dict[str, torch.Tensor]:
    """{module key: tensor} cast to `dtype` and moved to `device`, one tensor at a time."""
    out = {}
    with safe_open(file, framework="pt") as handle:
        for key in handle.keys():
            out[disk_to_module_key(key)] = handle.get_tensor(key).to(device=device, dtype=dtype)
    return out


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


def infer_config(shapes: Mapping[str, Tuple[int, ...]]) -> Optional[dict]:
    """The constructor keys a file's shapes imply (version, z_channels, widths), or None if unrecognisable."""
    try:
        version = 2 if "encoder.conv_patchify.conv.conv.weight" in shapes else 1
        z_channels = shapes["decoder.conv_in.conv.weight"][1]
        encoder_ch = shapes["encoder.conv_in.conv.weight"][0]
        levels = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
        blocks = {int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m}
        enc_widths = [shapes[f"encoder.down.{i}.block.0.conv1.conv.weight"][0] for i in levels]
        dec_widths = [shapes[f"decoder.up.{i}.block.0.conv1.conv.weight"][0] for i in levels]
    except (KeyError, IndexError):
        return None
    decoder_ch = 0
    for w in dec_widths:
        decoder_ch = math.gcd(decoder_ch, w)
    if encoder_ch <= 0 or decoder_ch <= 0 or any(w % encoder_ch for w in enc_widths):
        return None
    return {
        "version": version,
        "z_channels": z_channels,
        "encoder_ch": encoder_ch,
        "encoder_ch_mult": tuple(w // encoder_ch for w in enc_widths),
        "decoder_ch": decoder_ch,
        "decoder_ch_mult": tuple(w // decoder_ch for w in dec_widths),
        "num_res_blocks": len(blocks),
    }


def check_shapes(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]], file: str,
                 config: Mapping[str, object]) -> None:
    """Raise VAEWeightsError listing missing / unexpected keys and shape mismatches, with a hint."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    shapes = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
              for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    parts = [f"StepVideo VAE: weights file '{file}' does not match the model built with "
             + ", ".join(f"{k}={v}" for k, v in config.items()) + ":"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:_LIST_LIMIT])
                     + (f"; ... ({len(shapes) - _LIST_LIMIT} more)" if len(shapes) > _LIST_LIMIT else ""))
    if any(k.startswith(_MODULE_PREFIX + "conv.") for k in unexpected):
        parts.append(f"The file stores module names ({_MODULE_PREFIX}*); official files store {_DISK_PREFIX}* "
                     f"(write files with StepVideoVAE.official_state_dict()).")
    implied = infer_config(found)
    if implied is not None:
        differ = {k: v for k, v in implied.items() if tuple(_as_tuple(config.get(k))) != tuple(_as_tuple(v))}
        if differ:
            parts.append("The file looks like a VAE with " + ", ".join(f"{k}={v}" for k, v in implied.items())
                         + "; set " + ", ".join(f"{k}={v}" for k, v in differ.items()) + " to load it.")
        else:
            parts.append("Its layout is otherwise recognisable; the file may be damaged or from another model.")
    else:
        parts.append(f"This is not a StepVideo VAE checkpoint in the official layout (expected keys such as "
                     f"encoder.conv_in.conv.weight and {_DISK_PREFIX}weight).")
    raise VAEWeightsError("\n".join(parts))


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)
