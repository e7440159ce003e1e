"""`StepVideoDiT.from_pretrained`: official diffusers folders and Megatron-layout checkpoints.

Official folder (`transformer/` of the download): config.json with the StepVideoModel
constructor keys, and diffusion_pytorch_model.safetensors or sharded
diffusion_pytorch_model-XXXXX-of-YYYYY.safetensors with their .index.json. The config comes
from config.json; `config` (e.g. the model JSON's predictor section) supplies what config.json
does not say (dtype, channel_split, attention norm settings, attention backend) and must agree
with it on the rest; keyword overrides (PredictorConfig keys) win over both.

Megatron folder (latest_checkpointed_iteration.txt + release/ or iter_XXXXXXX/ + mp_rank_XX/):
there is no config.json. The config is `config` when given, otherwise it is read off the
checkpoint's tensor shapes (layers, heads from the q_norm width, channels, i2v from the
motion-score embedder); keyword overrides win. Either way the load is strict, so a config
that does not match the tensors fails with the keys and shapes that disagree.

Each TP rank reads only its own part, once, and host memory stays near one copy of that part:
the model is built on `meta` (no memory, no initialisation); keys and shapes are checked
against the safetensors headers or the pickle's metadata before any tensor is read; then the
model gets uninitialised memory and every tensor is copied straight into its parameter as it is
read: an official tensor's rank slice (the fused projections regrouped to [Q; K; V] on the
way), or a Megatron rank file's tensor through a memory map (`torch.load(mmap=True)`), whose
pages are given back after each copy (`checkpoint/file_pages.py`). Megatron checkpoints must
have this run's TP size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from mindspeed_mm.checkpoint import is_megatron_checkpoint, load_model_state_dict
from mindspeed_mm.checkpoint.file_pages import FilePages
from mindspeed_mm.checkpoint.dist_format import MODEL_PREFIX, is_dist_checkpoint, load_dit_weights
from mindspeed_mm.checkpoint.megatron_layout import iteration_dir
from mindspeed_mm.config.base import ConfigError, from_dict, to_dict
from mindspeed_mm.config.model import PredictorConfig
from mindspeed_mm.checkpoint.safetensors_io import open_safetensors, read_json_file
from mindspeed_mm.checkpoint.official_layout import OFFICIAL_LAYOUT, WeightsNotFoundError
from mindspeed_mm.runtime.device import current_device

from mindspeed_mm.checkpoint import stepvideo_adapter as adapter
from mindspeed_mm.checkpoint.stepvideo_adapter import PretrainedLoadError, infer_config_from_state_dict
from mindspeed_mm.checkpoint.stepvideo_layout import plan_for_parameter

from .parallelize import current_parallel_state, parallelize_stepvideo

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
_LIST_LIMIT = 20


def _listing(items, limit=_LIST_LIMIT) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_pretrained(cls, path, config: Optional[PredictorConfig] = None, device=None, **overrides):
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(
            f"StepVideo DiT: '{path}' (from_pretrained / --load) does not exist. Expected either the official "
            f"transformer/ folder or a converted Megatron-layout checkpoint.\n{OFFICIAL_LAYOUT}"
        )
    if is_megatron_checkpoint(path):
        if is_dist_checkpoint(iteration_dir(path)):
            return _load_megatron_dist(cls, path, config, device, overrides)
        return _load_megatron(cls, path, config, device, overrides)
    if (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file():
        return _load_official(cls, path, config, device, overrides)
    hint = ""
    if (path / "transformer" / CONFIG_NAME).is_file():
        hint = f" It has a transformer/ subfolder: did you mean '{path / 'transformer'}'?"
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else []
    raise WeightsNotFoundError(
        f"StepVideo DiT: '{path}' is neither an official DiT folder ({CONFIG_NAME} + {WEIGHTS_NAME} or "
        f"{INDEX_NAME} with its shards) nor a Megatron-layout checkpoint (latest_checkpointed_iteration.txt + "
        f"release/ or iter_XXXXXXX/ + mp_rank_XX/); it holds {found}.{hint} We never start from random "
        f"weights silently.\n{OFFICIAL_LAYOUT}"
    )


# --- config ---------------------------------------------------------------------------------


def _make_config(base: Dict, overrides: Mapping, source: str) -> PredictorConfig:
    fields = {f.name for f in dataclasses.fields(PredictorConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"from_pretrained: unknown override(s) {unknown}; valid keys: {sorted(fields)}.")
    merged = dict(base)
    merged.update(overrides)
    if "channel_split" not in merged and "head_dim" in merged:
        merged["channel_split"] = adapter.default_channel_split(merged["head_dim"])
    return from_dict(PredictorConfig, merged, source=source)


def _official_config(path: Path, config: Optional[PredictorConfig], overrides: Mapping) -> PredictorConfig:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise WeightsNotFoundError(
            f"StepVideo DiT: '{path}' has weights but no {CONFIG_NAME}; the official transformer/ folder "
            f"carries one with the StepVideoModel constructor keys.\n{OFFICIAL_LAYOUT}"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON: {exc.msg} at line {exc.lineno}.") from exc
    try:
        official = adapter.predictor_kwargs_from_official_config(raw, str(cfg_path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base: Dict = {}
    if config is not None:
        base = to_dict(config)
        conflicts = [f"{k}: model config {base[k]!r} vs {CONFIG_NAME} {v!r}" for k, v in official.items()
                     if k in base and base[k] != v and k not in overrides]
        if conflicts:
            raise ConfigError(
                f"{cfg_path} disagrees with the predictor config on {'; '.join(conflicts)}. Fix the model JSON's "
                f"predictor section or point from_pretrained at the matching weights."
            )
    base.update(official)
    base.pop("from_pretrained", None)
    return _make_config(base, overrides, str(cfg_path))


# --- strict loading -------------------------------------------------------------------------


def _check_strict(model, local_shapes: Dict[str, tuple], full_shapes: Dict[str, tuple], source: str,
                  official_names: bool, unsplittable=()) -> None:
    """Check the checkpoint's keys and this rank's shapes against the model (which may still be on `meta`), before
    any tensor is read. `full_shapes` are the unsharded checkpoint shapes (for messages). Keys in `unsplittable`
    could not be permuted or sliced for TP and always count as mismatched."""
    expected = model.state_dict()
    tp = model.parallel.tp

    def name(k):
        return adapter.our_key_to_official(k) if official_names else k

    missing = sorted(name(k) for k in expected if k not in local_shapes)
    unexpected = sorted(name(k) for k in local_shapes if k not in expected)
    mismatched = []
    for k in sorted(set(expected) & set(local_shapes)):
        if k in unsplittable or tuple(local_shapes[k]) != tuple(expected[k].shape):
            want = adapter.full_shape(k, expected[k].shape, tp)
            got = full_shapes.get(k, tuple(local_shapes[k]))
            mismatched.append(f"{name(k)}: checkpoint {tuple(got)} vs model {tuple(want)}")
    if missing or unexpected or mismatched:
        cfg = model.predictor_config
        parts = [f"Cannot load the StepVideo DiT strictly from {source}."]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}.")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}.")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}.")
        parts.append(
            f"The model was built with num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, "
            f"head_dim={cfg.head_dim}, in_channels={cfg.in_channels}, out_channels={cfg.out_channels}, "
            f"caption_channels={cfg.caption_channels}, use_additional_conditions={cfg.use_additional_conditions}; "
            f"make the predictor config match the checkpoint (t2v vs i2v weights, layer count) or point "
            f"from_pretrained at the right weights."
        )
        raise PretrainedLoadError(" ".join(parts))


# --- building without initialising, copying as we read ----------------------------------------


def _empty_model(cls, cfg: PredictorConfig, parallel=None):
    """The DiT on `meta` with the parallel plan applied (`parallel`, default the job's): shapes, names and Megatron's
    parallel marks, but no memory and no initialisation. `_materialize` then gives it memory that the load writes
    exactly once."""
    return parallelize_stepvideo(cls(cfg, device="meta", perform_initialization=False), parallel)


def build_model(cls, cfg: PredictorConfig, device=None, perform_initialization: bool = True, parallel=None):
    """`StepVideoDiT.build`: plain on `meta`, the plan applied, then each rank's share given memory and (unless
    told not to) random weights, so no rank ever holds the whole model."""
    model = _materialize(_empty_model(cls, cfg, parallel), device)
    if perform_initialization:
        model.reset_parameters()
    return model


def _materialize(model, device=None):
    """Give every `meta` parameter and buffer uninitialised memory on `device` (default: this run's device).

    `Module.to_empty` would do this but replaces each Parameter with a new one and so drops the attributes
    Megatron's layers and `parallelize.build_linear` set on them (`tensor_model_parallel`, `partition_dim`,
    `allreduce`): the grad norm would then count split weights on TP rank 0 only. They are carried over here.
    Uninitialised memory costs no host RSS until it is written."""
    target = torch.device(device) if device is not None else current_device()
    done: Dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                new = torch.nn.Parameter(torch.empty_like(param, device=target), requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)
                done[id(param)] = new
            module._parameters[name] = done[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=target)
    return model


def copy_model(model):
    """A second DiT with `model`'s config, device and weights, built without initialising and filled tensor by
    tensor from `model` (DPO's actor and reference from one read of the checkpoint)."""
    clone = _materialize(_empty_model(type(model), model.predictor_config, model.parallel), model.device)
    with torch.no_grad():
        source = model.state_dict()
        for key, tensor in clone.state_dict().items():
            tensor.copy_(source[key])
    return clone


def _weight_files(path: Path):
    index = path / INDEX_NAME
    if index.is_file():
        raw = read_json_file(index, "StepVideo DiT")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedLoadError(f"{index} has no 'weight_map'; it is not a safetensors index.")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise WeightsNotFoundError(
                f"StepVideo DiT: {index} lists shard(s) {absent} that are not in '{path}'; the download is "
                f"incomplete.\n{OFFICIAL_LAYOUT}"
            )
        return [path / f for f in files]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise WeightsNotFoundError(
        f"StepVideo DiT: '{path}' has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {INDEX_NAME} "
        f"(safetensors present: {found}).\n{OFFICIAL_LAYOUT}"
    )


def _load_official(cls, path: Path, config, device, overrides):
    cfg = _official_config(path, config, overrides)
    files = _weight_files(path)
    model = _empty_model(cls, cfg)
    state = model.parallel
    headers: Dict[str, tuple] = {}  # our key -> (file, official key, full shape)
    local_shapes: Dict[str, tuple] = {}
    unsplittable = set()
    for file in files:  # headers only: no tensor data is read before the strict check
        with open_safetensors(file, "StepVideo DiT") as handle:
            for official_key in handle.keys():
                key = adapter.official_key_to_ours(official_key)
                if key in headers:
                    raise PretrainedLoadError(f"{official_key} is stored twice: in {headers[key][0].name} and "
                                              f"{file.name}.")
                shape = tuple(handle.get_slice(official_key).get_shape())
                headers[key] = (file, official_key, shape)
                try:  # the same permutation and TP slicing as the data will get, on a shape-only tensor
                    _, meta = adapter.official_tensor_to_ours(official_key, torch.empty(shape, device="meta"),
                                                              cfg.head_dim)
                    local_shapes[key] = tuple(adapter.shard_tensor(key, meta, state.tp_rank, state.tp).shape)
                except ValueError:
                    unsplittable.add(key)  # wrong shape: reported with every other mismatch below
                    local_shapes[key] = shape
    _check_strict(model, local_shapes, {k: h[2] for k, h in headers.items()},
                  f"'{path}' (official layout, files {[f.name for f in files]})", official_names=True,
                  unsplittable=unsplittable)
    _materialize(model, device)
    params = model.state_dict()
    with torch.no_grad():
        for file in files:
            pages = FilePages(file)
            with open_safetensors(file, "StepVideo DiT") as handle:
                for official_key in handle.keys():
                    key = adapter.official_key_to_ours(official_key)
                    index = adapter.official_rank_index(key, headers[key][2], state.tp_rank, state.tp)
                    part = handle.get_slice(official_key)[index]  # this rank's bytes only
                    pages.copy(*adapter.official_part_views(params[key], key, part, cfg.head_dim))
                    del part
    return model


def _load_megatron(cls, path: Path, config, device, overrides):
    state = current_parallel_state()
    sd, file = load_model_state_dict(path, tp_rank=state.tp_rank, tp_size=state.tp)  # mapped: nothing read yet
    source = str(file)
    base = to_dict(config) if config is not None else infer_config_from_state_dict(sd, source)
    base.pop("from_pretrained", None)
    cfg = _make_config(base, overrides, source)
    model = _empty_model(cls, cfg)
    _check_strict(model, {k: tuple(v.shape) for k, v in sd.items()}, {},
                  f"'{file}' (Megatron layout, TP rank {state.tp_rank} of {state.tp})", official_names=False)
    _materialize(model, device)
    params = model.state_dict()
    pages = FilePages(file)
    with torch.no_grad():
        for key in list(sd):
            tensor = sd.pop(key)
            pages.copy(params[key], tensor)  # the file's dtype to the model's, as load_state_dict(v.to(dtype)) did
            del tensor
    return model


def _load_megatron_dist(cls, path: Path, config, device, overrides):
    """A distributed (torch_dist) checkpoint: the config from `config` or the global shapes, then this rank's slices."""
    from megatron.core import dist_checkpointing

    iter_dir = iteration_dir(path)
    source = f"'{iter_dir}' (distributed checkpoint)"
    if config is not None:
        base = to_dict(config)
    else:
        shapes = {}
        for key, meta in dist_checkpointing.load_tensors_metadata(str(iter_dir)).items():
            if key.startswith(MODEL_PREFIX):
                shape = tuple(meta.global_shape)
                plan, _ = plan_for_parameter(key[len(MODEL_PREFIX):])
                if plan is not None and plan.fused > 1:
                    shape = (shape[0] * shape[1], *shape[2:])  # stored as (parts, rows, ...)
                shapes[key[len(MODEL_PREFIX):]] = torch.empty(shape, device="meta")
        base = infer_config_from_state_dict(shapes, source)
    base.pop("from_pretrained", None)
    model = _empty_model(cls, _make_config(base, overrides, source))
    _materialize(model, device)  # uninitialised: every tensor is read into it below
    load_dit_weights(model, iter_dir)
    return model
