"""Reading the official diffusers folder (transformer/) for a conversion: its safetensors files (through the index
when there is one), their headers (key -> file, shape) and its config.json, or the config read off the tensor
shapes when the folder has none."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import stepvideo_adapter as adapter
from .conversion_checks import ConversionError
from .safetensors_io import open_safetensors, read_json_file

OFFICIAL_WEIGHTS = "diffusion_pytorch_model.safetensors"
OFFICIAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
OFFICIAL_CONFIG = "config.json"
SOURCE_FLAG = "--source_path"


def official_files(source: Path) -> List[Path]:
    if not source.exists():
        raise ConversionError(f"--source_path {source} does not exist; point it at the transformer/ folder of the "
                              f"official download.")
    index = source / OFFICIAL_INDEX
    if index.is_file():
        raw = read_json_file(index, SOURCE_FLAG)
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


def official_headers(files: Sequence[Path]) -> Dict[str, Tuple[Path, Tuple[int, ...]]]:
    found: Dict[str, Tuple[Path, Tuple[int, ...]]] = {}
    for file in files:
        with open_safetensors(file, SOURCE_FLAG) as handle:
            for key in handle.keys():
                if key in found:
                    raise ConversionError(f"{key} is stored twice: in {found[key][0].name} and {file.name}.")
                found[key] = (file, tuple(handle.get_slice(key).get_shape()))
    return found


def official_config(source: Path, headers: Dict[str, Tuple[Path, Tuple[int, ...]]]) -> dict:
    path = source / OFFICIAL_CONFIG
    if path.is_file():
        config = read_json_file(path, SOURCE_FLAG)
        if not isinstance(config, dict):
            raise ConversionError(f"{path}: expected a JSON object (the official DiT config), got "
                                  f"{type(config).__name__}.")
        adapter.predictor_kwargs_from_official_config(config, str(path))  # required keys, known keys
        return config
    # No config.json: read the architecture off the tensor shapes.
    shapes = {adapter.official_key_to_ours(k): s for k, (_, s) in headers.items()}
    return official_config_from_shapes(shapes, str(source))


def official_config_from_shapes(shapes: Dict[str, Tuple[int, ...]], source: str) -> dict:
    from ..config.model import PredictorConfig
    from .stepvideo_adapter import infer_config_from_state_dict

    class _Shape:  # infer_config_from_state_dict reads `.shape` only
        def __init__(self, shape):
            self.shape = shape

    kwargs = infer_config_from_state_dict({k: _Shape(s) for k, s in shapes.items()}, source)
    kwargs["channel_split"] = adapter.default_channel_split(kwargs["head_dim"])
    return adapter.official_config_from_predictor(PredictorConfig(**kwargs))
