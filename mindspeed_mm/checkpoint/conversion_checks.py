"""What a conversion checks before it reads a tensor, and where each key goes.

`ConversionError` (every refusal of the converter), the target `Layout` (TP x per-stage layer counts) and
`validate_layout`, `check_blocks` (the blocks the checkpoint holds against --num_layers) and `stage_of` (which
pipeline stage holds a key, renumbered within it). Pre-process weights go to the first stage, post-process weights
to the last, and a key that fits nowhere is an error: no key is ever dropped.
Also `listing` (the sorted names an error message shows) and `print_log`, the default log of every mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..errors import MindSpeedMMError

BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
PRE_PROCESS = ("pos_embed.", "adaln_single.", "caption_projection.", "clip_projection.", "caption_norm.")
POST_PROCESS = ("scale_shift_table", "norm_out.", "proj_out.")


class ConversionError(MindSpeedMMError, ValueError):
    """A conversion that cannot run; the message names the path or flag and the fix."""


@dataclass
class Layout:
    tp: int
    pp_layers: List[int]

    @property
    def pp(self) -> int:
        return len(self.pp_layers)


def print_log(msg: str) -> None:
    print(msg, flush=True)


def _natural(text: str) -> list:
    """Sort key that orders the numbers inside names by value: block 9 before block 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def listing(items, limit: int = 12) -> str:
    items = sorted((str(i) for i in items), key=_natural)
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def validate_layout(tp_size: int, pp_layers: Sequence[int], num_layers: int, num_heads: int) -> Layout:
    if tp_size < 1:
        raise ConversionError(f"--tp_size {tp_size} must be at least 1.")
    if not pp_layers or any(n < 1 for n in pp_layers):
        raise ConversionError(f"--pp_size {list(pp_layers)}: give the number of layers of each pipeline stage, "
                              f"each at least 1 (e.g. '--pp_size {num_layers}' for one stage).")
    if sum(pp_layers) != num_layers:
        raise ConversionError(
            f"--pp_size {' '.join(map(str, pp_layers))} sums to {sum(pp_layers)} layers, but --num_layers is "
            f"{num_layers}; the per-stage layer counts must add up to --num_layers (e.g. '--pp_size {num_layers}' "
            f"for one stage, '--pp_size {num_layers // 2} {num_layers - num_layers // 2}' for two)."
        )
    if num_heads % tp_size != 0:
        raise ConversionError(
            f"num_heads {num_heads} is not divisible by --tp_size {tp_size}; each tensor-parallel rank holds "
            f"num_heads / TP whole heads. Choose a --tp_size that divides {num_heads}."
        )
    return Layout(tp_size, list(pp_layers))


def check_blocks(keys: Sequence[str], num_layers: int, source: str, flag_value: int) -> None:
    blocks = {int(m.group(1)) for k in keys if (m := BLOCK_KEY.match(k))}
    have = (max(blocks) + 1) if blocks else 0
    missing_blocks = sorted(set(range(num_layers)) - blocks)
    if missing_blocks:
        raise ConversionError(
            f"{source}: keys missing for --num_layers {flag_value}: no transformer_blocks "
            f"{listing(missing_blocks)} (the checkpoint has {len(blocks)} blocks). Set --num_layers "
            f"{have} to convert what is there, or point --source_path at the complete checkpoint."
        )
    extra = sorted(b for b in blocks if b >= num_layers)
    if extra:
        raise ConversionError(
            f"{source}: unexpected keys for --num_layers {flag_value}: transformer_blocks "
            f"{listing(extra)} exist beyond layer {num_layers - 1}. Set --num_layers {have}; "
            f"blocks are never dropped silently."
        )


def stage_of(key: str, pp_layers: Sequence[int]) -> List[Tuple[int, str]]:
    """[(pp_rank, key within that stage)] for one of our keys."""
    m = BLOCK_KEY.match(key)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        start = 0
        for stage, count in enumerate(pp_layers):
            if index < start + count:
                return [(stage, f"transformer_blocks.{index - start}.{rest}")]
            start += count
        raise ConversionError(f"{key}: block {index} is beyond the {sum(pp_layers)} layers of --pp_size.")
    if key.startswith(PRE_PROCESS):
        return [(0, key)]
    if key.startswith(POST_PROCESS):
        return [(len(pp_layers) - 1, key)]
    raise ConversionError(f"{key} is neither a block, pre-process nor post-process weight; refusing to drop it.")
