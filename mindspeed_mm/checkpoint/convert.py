"""StepVideo DiT checkpoint conversion: official <-> Megatron layout, TP/PP split, merge, export.

    split   official diffusers folder (transformer/)  -> Megatron layout at TP x PP
    merge   Megatron layout (release or iter_*, any TP x PP, e.g. from training) -> Megatron layout at TP x PP:
            MindSpeed-MM's "merge" joins all the shards and re-splits them for the target TP (which may be larger
            than the source's); the log says "merged N shards into TP=k"
    export  Megatron layout -> official diffusers folder (sharded safetensors + index + config.json)

merge and export take a LoRA adapter (`lora_load`, the --save folder of a LoRA run): it is merged into the base
(W += B A alpha/r) before the re-split or the export. `export_adapter` writes the adapter alone, peft-style with the
official names (`stepvideo_lora.py`).

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

The modes live here; what they are made of lives beside them: `conversion_checks.py` (ConversionError, the target
layout and the key checks), `official_source.py` (reading the official folder), `megatron_source.py`
(`read_megatron_full`) and `atomic.py` (the temporary output folder and the rank files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import stepvideo_adapter as adapter
from .atomic import AtomicDir, save_ranks
from .conversion_checks import ConversionError, Layout, check_blocks, print_log, stage_of, validate_layout
from .megatron_source import read_megatron_full
from .official_source import (
    OFFICIAL_CONFIG,
    OFFICIAL_INDEX,
    OFFICIAL_WEIGHTS,
    SOURCE_FLAG,
    official_config,
    official_config_from_shapes,
    official_files,
    official_headers,
)
from .safetensors_io import check_keys_and_shapes, open_safetensors
from .stepvideo_lora import merge_adapter, read_adapter, write_peft_adapter


def _distribute(key: str, tensor: torch.Tensor, layout: Layout, ranks: Dict) -> None:
    """Place one full tensor (our layout) into every (tp, pp) rank dict that holds it.

    Split tensors are cloned per rank (a view would make torch.save write the whole storage);
    a replicated tensor is cloned once and shared by every rank dict. Nothing keeps a reference
    into the source file's memory map, so each source shard is released once it is read.
    """
    shared = None
    for pp_rank, local_key in stage_of(key, layout.pp_layers):
        for tp_rank in range(layout.tp):
            part = adapter.shard_tensor(key, tensor, tp_rank, layout.tp)
            if part is tensor:
                shared = tensor.clone() if shared is None else shared
                part = shared
            else:
                part = part.clone()
            ranks.setdefault((tp_rank, pp_rank), {})[local_key] = part


def split(source_path, target_path, tp_size: int, pp_layers: Sequence[int], num_layers: int,
          num_heads: Optional[int] = None, overwrite: bool = False, log=print_log) -> Path:
    """Official diffusers folder -> Megatron layout (`release`) at TP x PP."""
    source, target = Path(source_path), Path(target_path)
    files = official_files(source)
    headers = official_headers(files)
    config = official_config(source, headers)
    check_blocks(list(headers), num_layers, str(source), num_layers)
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
            with open_safetensors(file, SOURCE_FLAG) as handle:
                for official_key in handle.keys():
                    key, tensor = adapter.official_tensor_to_ours(official_key, handle.get_tensor(official_key),
                                                                  head_dim)
                    _distribute(key, tensor, layout, ranks)
                    del tensor
        save_ranks(out, ranks, layout.pp, log)
    log(f"wrote {len(ranks)} rank file(s) and latest_checkpointed_iteration.txt ('release') under {target}")
    return target


def _check_full(full: Dict[str, torch.Tensor], num_layers: Optional[int], source: str) -> dict:
    if num_layers is not None:
        check_blocks(list(full), num_layers, source, num_layers)
    config = official_config_from_shapes({k: tuple(v.shape) for k, v in full.items()}, source)
    expected = {adapter.official_key_to_ours(k): s for k, s in adapter.official_param_shapes(config).items()}
    check_keys_and_shapes(expected, {k: tuple(v.shape) for k, v in full.items()}, source)
    return config


def _read_base(source: Path, num_layers: Optional[int], lora_load, lora_alpha: Optional[float],
               lora_r: Optional[int], log):
    """The full base (our names), its config and read info, with the adapter `lora_load` merged when given."""
    lora = read_adapter(lora_load, lora_alpha, lora_r, log) if lora_load else None  # small: fail before the base
    full, info = read_megatron_full(source, log)
    config = _check_full(full, num_layers, str(source))
    if lora is not None:
        merge_adapter(full, lora, log)
    return full, info, config


def merge(source_path, target_path, tp_size: int, pp_layers: Sequence[int], num_layers: int,
          num_heads: Optional[int] = None, overwrite: bool = False, log=print_log, lora_load=None,
          lora_alpha: Optional[float] = None, lora_r: Optional[int] = None) -> Path:
    """Megatron layout (any TP x PP, release or iter_*) -> Megatron layout (`release`) at TP x PP.

    As in MindSpeed-MM, "merge" means: join every shard into the full model, then split it again for the target
    `tp_size` and `pp_layers`, so TP 1 gives one file and TP 2 two. With `lora_load` the adapter is merged in first.
    """
    source, target = Path(source_path), Path(target_path)
    AtomicDir(target, overwrite, source)  # refuse a bad target before reading anything
    full, info, config = _read_base(source, num_layers, lora_load, lora_alpha, lora_r, log)
    heads = config["num_attention_heads"]
    if num_heads is not None and num_heads != heads:
        raise ConversionError(f"--num_heads {num_heads} does not match the checkpoint's {heads} heads.")
    layout = validate_layout(tp_size, pp_layers, num_layers, heads)
    ranks: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
    with AtomicDir(target, overwrite, source) as out:
        for key in list(full):
            _distribute(key, full.pop(key), layout, ranks)
        save_ranks(out, ranks, layout.pp, log)
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
           overwrite: bool = False, shard_size_gb: float = 10.0, log=print_log, lora_load=None,
           lora_alpha: Optional[float] = None, lora_r: Optional[int] = None) -> Path:
    """Megatron layout -> official diffusers folder (config.json + sharded safetensors + index), with the adapter
    `lora_load` merged in when given."""
    from safetensors.torch import save_file

    source, target = Path(source_path), Path(target_path)
    AtomicDir(target, overwrite, source)
    full, info, config = _read_base(source, num_layers, lora_load, lora_alpha, lora_r, log)
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


def export_adapter(lora_load, target_path, num_heads: Optional[int] = None, overwrite: bool = False,
                   lora_alpha: Optional[float] = None, lora_r: Optional[int] = None, log=print_log) -> Path:
    """A LoRA run's adapter (any TP) -> adapter_model.safetensors + adapter_config.json (peft, official names)."""
    AtomicDir(Path(target_path), overwrite, Path(lora_load))
    lora = read_adapter(lora_load, lora_alpha, lora_r, log)
    return write_peft_adapter(lora, target_path, num_heads=num_heads, overwrite=overwrite, log=log)
