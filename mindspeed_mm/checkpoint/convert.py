"""StepVideo DiT checkpoint conversion: official <-> Megatron layout, TP/PP split, merge, export.

    split   official diffusers folder (transformer/)  -> Megatron layout at TP x PP
    merge   Megatron layout (release or iter_*, any TP x PP, e.g. from training) -> Megatron layout at TP x PP:
            MindSpeed-MM's "merge" joins all the shards and re-splits them for the target TP (which may be larger
            than the source's); the log says "merged N shards into TP=k"
    export  Megatron layout -> official diffusers folder (sharded safetensors + index + config.json)

Key names and the [Q;K;V] / [K;V] layout inside Megatron checkpoints are MindSpeed-MM's, through the
one adapter the DiT loader also uses (`models/predictor/stepvideo/state_dict_adapter.py`).

Pipeline stages (`pp_layers`, e.g. [24, 24]) renumber the blocks from 0 in every stage. The first
stage also holds the pre-process weights (patch embedding, the whole `adaln_single` including the
i2v motion-score embedder, caption and clip projections); the last stage holds the final
`scale_shift_table`, `norm_out` and `proj_out`. No key is ever dropped: a key that fits nowhere is
an error.

Every check that can fail (paths, keys for `num_layers`, unexpected keys, heads divisible by TP,
stage sizes) runs on file headers before any tensor is read. Output goes to a temporary folder
beside the target, renamed into place at the end, so a failed run never leaves a half-written
checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .safetensors_io import check_keys_and_shapes, open_safetensors, read_json_file
from . import stepvideo_adapter as adapter
from .megatron_layout import (
    CHECKPOINT_FILENAME,
    RELEASE,
    CheckpointError,
    iteration_dir,
    iteration_dir_name,
    parallel_sizes,
    rank_dir_name,
    read_tracker,
    scan_rank_dirs,
    torch_load,
    write_tracker,
)
from ..errors import MindSpeedMMError
from .dist_format import is_dist_checkpoint, read_full_model

OFFICIAL_WEIGHTS = "diffusion_pytorch_model.safetensors"
OFFICIAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
OFFICIAL_CONFIG = "config.json"
_WHAT = "--source_path"
_RANK_FILE_FIX = ("Copy the checkpoint again from where it was saved, or point --source_path at another complete "
                  "checkpoint (an earlier iter_XXXXXXX of the same run, or a fresh conversion).")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
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


def _print(msg: str) -> None:
    print(msg, flush=True)


def _natural(text: str) -> list:
    """Sort key that orders the numbers inside names by value: block 9 before block 10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _listing(items, limit: int = 12) -> str:
    items = sorted((str(i) for i in items), key=_natural)
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---- validation helpers ---------------------------------------------------------------------


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


def _check_blocks(keys: Sequence[str], num_layers: int, source: str, flag_value: int) -> None:
    blocks = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    have = (max(blocks) + 1) if blocks else 0
    missing_blocks = sorted(set(range(num_layers)) - blocks)
    if missing_blocks:
        raise ConversionError(
            f"{source}: keys missing for --num_layers {flag_value}: no transformer_blocks "
            f"{_listing(missing_blocks)} (the checkpoint has {len(blocks)} blocks). Set --num_layers "
            f"{have} to convert what is there, or point --source_path at the complete checkpoint."
        )
    extra = sorted(b for b in blocks if b >= num_layers)
    if extra:
        raise ConversionError(
            f"{source}: unexpected keys for --num_layers {flag_value}: transformer_blocks "
            f"{_listing(extra)} exist beyond layer {num_layers - 1}. Set --num_layers {have}; "
            f"blocks are never dropped silently."
        )


def _stage_of(key: str, pp_layers: Sequence[int]) -> List[Tuple[int, str]]:
    """[(pp_rank, key within that stage)] for one of our keys."""
    m = _BLOCK.match(key)
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


# ---- atomic output ---------------------------------------------------------------------------


class AtomicDir:
    """Write into a temporary sibling folder, then move it onto `target` (replacing it on success only)."""

    def __init__(self, target: Path, overwrite: bool, source: Optional[Path] = None):
        self.target = Path(target).absolute()
        if source is not None:
            src = Path(source).absolute()
            if self.target == src or src in self.target.parents or self.target in src.parents:
                raise ConversionError(f"--target_path {target} overlaps --source_path {source}; "
                                      f"write the conversion to a separate folder.")
        if self.target.exists() and not self.target.is_dir():
            raise ConversionError(f"--target_path {target} exists and is a file; choose a folder path.")
        if self.target.is_dir() and any(self.target.iterdir()) and not overwrite:
            raise ConversionError(
                f"--target_path {target} exists and is not empty; pass --overwrite to replace it, or choose a new "
                f"folder. Nothing was written."
            )
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save_ranks(folder: Path, ranks: Dict[Tuple[int, int], Dict[str, torch.Tensor]], pp: int, log,
                iteration=RELEASE) -> None:
    for (tp_rank, pp_rank), state in sorted(ranks.items()):
        rank_dir = folder / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank if pp > 1 else None)
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "checkpoint_version": 3.0}, rank_dir / CHECKPOINT_FILENAME)
        log(f"  wrote {rank_dir.name}/{CHECKPOINT_FILENAME}")
    write_tracker(folder, iteration)


def _distribute(key: str, tensor: torch.Tensor, layout: Layout, ranks: Dict) -> None:
    """Place one full tensor (our layout) into every (tp, pp) rank dict that holds it.

    Split tensors are cloned per rank (a view would make torch.save write the whole storage);
    a replicated tensor is cloned once and shared by every rank dict. Nothing keeps a reference
    into the source file's memory map, so each source shard is released once it is read.
    """
    shared = None
    for pp_rank, local_key in _stage_of(key, layout.pp_layers):
        for tp_rank in range(layout.tp):
            part = adapter.shard_tensor(key, tensor, tp_rank, layout.tp)
            if part is tensor:
                shared = tensor.clone() if shared is None else shared
                part = shared
            else:
                part = part.clone()
            ranks.setdefault((tp_rank, pp_rank), {})[local_key] = part


def _place_shard(full: torch.Tensor, key: str, shard: torch.Tensor, tp_rank: int, tp: int) -> None:
    """Copy TP rank `tp_rank`'s part into the preallocated full tensor (inverse of shard_tensor)."""
    dim = next(d for d in range(full.dim()) if full.shape[d] != shard.shape[d])
    probe_shape = [1] * full.dim()
    probe_shape[dim] = full.shape[dim]
    probe = torch.arange(full.shape[dim]).view(probe_shape)
    index = adapter.shard_tensor(key, probe, tp_rank, tp).flatten()
    full.index_copy_(dim, index, shard)


# ---- official source -------------------------------------------------------------------------


def _official_files(source: Path) -> List[Path]:
    if not source.exists():
        raise ConversionError(f"--source_path {source} does not exist; point it at the transformer/ folder of the "
                              f"official download.")
    index = source / OFFICIAL_INDEX
    if index.is_file():
        raw = read_json_file(index, _WHAT)
        weight_map = (raw.get("weight_map") if isinstance(raw, dict) else None) or {}
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no 'weight_map'; it is not a safetensors index. Download it again.")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (source / f).is_file()]
        if absent:
            raise ConversionError(f"{index} lists shard(s) {absent} that are missing from {source}; finish the "
                                  f"download first.")
        return [source / f for f in files]
    files = sorted(source.glob("*.safetensors"))
    if files:
        return files
    hint = (f" It has a transformer/ subfolder: use --source_path {source / 'transformer'}."
            if (source / "transformer").is_dir() else "")
    raise ConversionError(f"--source_path {source} holds no *.safetensors files (and no {OFFICIAL_INDEX}); point it "
                          f"at the official transformer/ folder.{hint}")


def _official_headers(files: Sequence[Path]) -> Dict[str, Tuple[Path, Tuple[int, ...]]]:
    found: Dict[str, Tuple[Path, Tuple[int, ...]]] = {}
    for file in files:
        with open_safetensors(file, _WHAT) as handle:
            for key in handle.keys():
                if key in found:
                    raise ConversionError(f"{key} is stored twice: in {found[key][0].name} and {file.name}.")
                found[key] = (file, tuple(handle.get_slice(key).get_shape()))
    return found


def _official_config(source: Path, headers: Dict[str, Tuple[Path, Tuple[int, ...]]]) -> dict:
    path = source / OFFICIAL_CONFIG
    if path.is_file():
        config = read_json_file(path, _WHAT)
        if not isinstance(config, dict):
            raise ConversionError(f"{path}: expected a JSON object (the official DiT config), got "
                                  f"{type(config).__name__}.")
        adapter.predictor_kwargs_from_official_config(config, str(path))  # required keys, known keys
        return config
    # No config.json: read the architecture off the tensor shapes.
    shapes = {adapter.official_key_to_ours(k): s for k, (_, s) in headers.items()}
    return _official_config_from_shapes(shapes, str(source))


def _official_config_from_shapes(shapes: Dict[str, Tuple[int, ...]], source: str) -> dict:
    from ..config.model import PredictorConfig
    from .stepvideo_adapter import infer_config_from_state_dict

    class _Shape:  # infer_config_from_state_dict reads `.shape` only
        def __init__(self, shape):
            self.shape = shape

    kwargs = infer_config_from_state_dict({k: _Shape(s) for k, s in shapes.items()}, source)
    kwargs["channel_split"] = adapter.default_channel_split(kwargs["head_dim"])
    return adapter.official_config_from_predictor(PredictorConfig(**kwargs))


def split(source_path, target_path, tp_size: int, pp_layers: Sequence[int], num_layers: int,
          num_heads: Optional[int] = None, overwrite: bool = False, log=_print) -> Path:
    """Official diffusers folder -> Megatron layout (`release`) at TP x PP."""
    source, target = Path(source_path), Path(target_path)
    files = _official_files(source)
    headers = _official_headers(files)
    config = _official_config(source, headers)
    _check_blocks(list(headers), num_layers, str(source), num_layers)
    if config.get("num_layers", num_layers) != num_layers:
        raise ConversionError(f"{source / OFFICIAL_CONFIG} says num_layers {config['num_layers']} but --num_layers is "
                              f"{num_layers}; they must agree.")
    expected = adapter.official_param_shapes(config)
    check_keys_and_shapes(expected, {k: s for k, (_, s) in headers.items()}, str(source))
    heads = config["num_attention_heads"]
    if num_heads is not None and num_heads != heads:
        raise ConversionError(f"--num_heads {num_heads} does not match the checkpoint's {heads} heads "
                              f"({source / OFFICIAL_CONFIG}); drop --num_heads or fix it.")
    layout = validate_layout(tp_size, pp_layers, num_layers, heads)
    head_dim = config["attention_head_dim"]
    log(f"split {source} -> {target}: TP {layout.tp}, PP {layout.pp} ({' '.join(map(str, layout.pp_layers))} "
        f"layers), {len(headers)} tensors in {len(files)} file(s)")
    ranks: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
    with AtomicDir(target, overwrite, source) as out:
        for file in files:  # one source shard in memory at a time
            with open_safetensors(file, _WHAT) as handle:
                for official_key in handle.keys():
                    key, tensor = adapter.official_tensor_to_ours(official_key, handle.get_tensor(official_key),
                                                                  head_dim)
                    _distribute(key, tensor, layout, ranks)
                    del tensor
        _save_ranks(out, ranks, layout.pp, log)
    log(f"wrote {len(ranks)} rank file(s) and latest_checkpointed_iteration.txt ('release') under {target}")
    return target


# ---- Megatron source -------------------------------------------------------------------------


def _load_rank(path: Path, log) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete.")
    payload = torch_load(path, fix=_RANK_FILE_FIX)
    if not isinstance(payload, dict) or "model" not in payload:
        found = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has no 'model' entry (found {found}); expected torch.save({{'model': ...}}).")
    ignored = sorted(k for k in payload if k not in ("model", "checkpoint_version", "iteration", "args"))
    if ignored:
        log(f"notice: {path}: ignoring {', '.join(ignored)} (only model weights are converted)")
    return payload["model"]


def read_megatron_full(source_path, log=_print) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Every rank of a Megatron-layout checkpoint merged into one full state dict (our names).

    Rank files are read one at a time; each TP shard is copied into a preallocated full tensor,
    so memory stays near one copy of the model plus one rank file.
    """
    source = Path(source_path)
    if not source.exists():
        raise ConversionError(f"--source_path {source} does not exist; point it at a converted or trained checkpoint "
                              f"folder (the one holding latest_checkpointed_iteration.txt).")
    iteration = read_tracker(source)
    iter_dir = iteration_dir(source, iteration)
    if is_dist_checkpoint(iter_dir):
        return _read_dist_full(iter_dir, iteration, log)
    tp, pp = parallel_sizes(iter_dir)
    rank_dirs = scan_rank_dirs(iter_dir)
    log(f"reading {iter_dir}: TP {tp}, PP {pp}")
    full: Dict[str, torch.Tensor] = {}
    block_offset = 0
    for pp_rank in range(pp):
        stage_keys: Optional[set] = None
        for tp_rank in range(tp):
            path = rank_dirs[(tp_rank, None if pp == 1 else pp_rank)] / CHECKPOINT_FILENAME
            state = _load_rank(path, log)
            if stage_keys is None:
                stage_keys = set(state)
                blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
                if blocks != set(range(len(blocks))):
                    raise ConversionError(f"{path}: blocks {sorted(blocks)} are not numbered 0..{len(blocks) - 1}.")
                stage_layers = len(blocks)
            elif set(state) != stage_keys:
                raise ConversionError(f"{path} holds different keys than TP rank 0 of its stage: "
                                      f"{_listing(set(state) ^ stage_keys)}")
            for key in list(state):
                shard = state.pop(key)
                m = _BLOCK.match(key)
                full_key = f"transformer_blocks.{int(m.group(1)) + block_offset}.{m.group(2)}" if m else key
                shape = adapter.full_shape(full_key, shard.shape, tp)
                if tuple(shape) != tuple(shard.shape):  # split over TP: copy this rank's part in place
                    if tp_rank == 0:
                        full[full_key] = torch.empty(shape, dtype=shard.dtype)
                    _place_shard(full[full_key], full_key, shard, tp_rank, tp)
                elif full_key not in full:
                    full[full_key] = shard
                elif not torch.equal(full[full_key], shard):
                    where = f"TP rank {tp_rank}" + (f", PP rank {pp_rank}" if pp > 1 else "")
                    raise ConversionError(
                        f"{full_key} is replicated but {where} ({path}) holds different values than the rank read "
                        f"first; the ranks of this checkpoint diverged, so no merge of it is faithful."
                    )
            del state
        block_offset += stage_layers
    return full, {"iteration": iteration, "tp": tp, "pp": pp}


def _read_dist_full(iter_dir: Path, iteration, log) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A distributed (torch_dist) training checkpoint: its model tensors at full size, read in one process."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from ..runtime import destroy_runtime, initialize_runtime

    owns_runtime = not dist.is_initialized()  # reading goes through torch.distributed, one process is enough
    if owns_runtime:
        initialize_runtime(seed=0)
    try:
        full = read_full_model(iter_dir)
        tp = dist_checkpointing.load_common_state_dict(str(iter_dir)).get("layout", {}).get("tp", 1)
    finally:
        if owns_runtime:
            destroy_runtime()
    log(f"reading {iter_dir}: distributed checkpoint saved at TP {tp}")
    return full, {"iteration": iteration, "tp": tp, "pp": 1}


def _check_full(full: Dict[str, torch.Tensor], num_layers: Optional[int], source: str) -> dict:
    if num_layers is not None:
        _check_blocks(list(full), num_layers, source, num_layers)
    config = _official_config_from_shapes({k: tuple(v.shape) for k, v in full.items()}, source)
    expected = {adapter.official_key_to_ours(k): s for k, s in adapter.official_param_shapes(config).items()}
    check_keys_and_shapes(expected, {k: tuple(v.shape) for k, v in full.items()}, source)
    return config


def merge(source_path, target_path, tp_size: int, pp_layers: Sequence[int], num_layers: int,
          num_heads: Optional[int] = None, overwrite: bool = False, log=_print) -> Path:
    """Megatron layout (any TP x PP, release or iter_*) -> Megatron layout (`release`) at TP x PP.

    As in MindSpeed-MM, "merge" means: join every shard into the full model, then split it again for the target
    `tp_size` and `pp_layers`, so TP 1 gives one file and TP 2 two.
    """
    source, target = Path(source_path), Path(target_path)
    AtomicDir(target, overwrite, source)  # refuse a bad target before reading anything
    full, info = read_megatron_full(source, log)
    config = _check_full(full, num_layers, str(source))
    heads = config["num_attention_heads"]
    if num_heads is not None and num_heads != heads:
        raise ConversionError(f"--num_heads {num_heads} does not match the checkpoint's {heads} heads.")
    layout = validate_layout(tp_size, pp_layers, num_layers, heads)
    ranks: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
    with AtomicDir(target, overwrite, source) as out:
        for key in list(full):
            _distribute(key, full.pop(key), layout, ranks)
        _save_ranks(out, ranks, layout.pp, log)
    shards = info["tp"] * info["pp"]
    stages = f", PP={layout.pp}" if layout.pp > 1 else ""
    log(f"merged {shards} shard{'s' if shards > 1 else ''} (TP {info['tp']} x PP {info['pp']}, {info['iteration']}) "
        f"into TP={layout.tp}{stages} (re-split for the target --tp_size) at {target}")
    return target


def _official_shards(state: Dict[str, torch.Tensor], max_bytes: int) -> Iterator[List[str]]:
    chunk, size = [], 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(key)
        size += nbytes
    if chunk:
        yield chunk


def export(source_path, target_path, num_layers: Optional[int] = None, num_heads: Optional[int] = None,
           overwrite: bool = False, shard_size_gb: float = 10.0, log=_print) -> Path:
    """Megatron layout -> official diffusers folder (config.json + sharded safetensors + index)."""
    from safetensors.torch import save_file

    source, target = Path(source_path), Path(target_path)
    AtomicDir(target, overwrite, source)
    full, info = read_megatron_full(source, log)
    config = _check_full(full, num_layers, str(source))
    if num_heads is not None and num_heads != config["num_attention_heads"]:
        raise ConversionError(f"--num_heads {num_heads} does not match the checkpoint's "
                              f"{config['num_attention_heads']} heads.")
    head_dim = config["attention_head_dim"]
    official = dict(adapter.our_tensor_to_official(k, full.pop(k), head_dim) for k in list(full))
    groups = list(_official_shards(official, int(shard_size_gb * 2**30)))
    with AtomicDir(target, overwrite, source) as out:
        (out / OFFICIAL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        weight_map, total = {}, 0
        for i, keys in enumerate(groups):
            name = (OFFICIAL_WEIGHTS if len(groups) == 1
                    else f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
            save_file({k: official[k].contiguous() for k in keys}, str(out / name), metadata={"format": "pt"})
            for k in keys:
                weight_map[k] = name
                total += official[k].numel() * official[k].element_size()
                del official[k]
        if len(groups) > 1:
            (out / OFFICIAL_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}, indent=2) + "\n")
    log(f"exported {info['iteration']} (TP {info['tp']} x PP {info['pp']}) to the official layout at {target} "
        f"({len(groups)} file(s))")
    return target

