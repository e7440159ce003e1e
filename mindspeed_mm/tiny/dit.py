"""Write a (tiny) StepVideo DiT with random weights in the official diffusers folder layout.

    python -m mindspeed_mm.tiny.dit OUT_DIR [--layers 2 --heads 4 --head-dim 16 ...]

The folder is what `transformer/` of the official download looks like: config.json with the
StepVideoModel constructor keys, and either diffusion_pytorch_model.safetensors or shards
diffusion_pytorch_model-0000K-of-0000N.safetensors plus diffusion_pytorch_model.safetensors.index.json.
Tensors carry the official names and per-head fused QKV/KV layout, so tests and demos load
them through the same `StepVideoDiT.from_pretrained` path as the released 30B weights.

Every tensor is random (none at its default), drawn from a seed: norm weights 1 + 0.1·N(0,1),
biases and other vectors 0.05·N(0,1), scale-shift tables 0.1·N(0,1), matrices and kernels
N(0, s²) with s = clamp(1/sqrt(fan_in), 0.02, 0.2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

from mindspeed_mm.checkpoint.stepvideo_adapter import official_param_shapes

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def official_config(num_layers: int = 2, num_heads: int = 4, head_dim: int = 16, in_channels: int = 8,
                    out_channels: Optional[int] = None, caption_channels: Sequence[int] = (32, 16),
                    use_additional_conditions: bool = False, patch_size: int = 1, norm_eps: float = 1e-6,
                    dropout: float = 0.0) -> Dict:
    """A StepVideoModel constructor config (what the official transformer/config.json holds)."""
    return {
        "_class_name": "StepVideoModel",
        "num_attention_heads": num_heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels if out_channels is None else out_channels,
        "num_layers": num_layers,
        "dropout": dropout,
        "patch_size": patch_size,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": norm_eps,
        "use_additional_conditions": use_additional_conditions,
        "caption_channels": list(caption_channels),
        "attention_type": "torch",
    }


def random_official_state_dict(config: Mapping, seed: int = 0,
                               dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes of `config`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(official_param_shapes(config).items()):
        if key.endswith("scale_shift_table"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1 and ("norm" in key.rsplit(".", 2)[-2]) and key.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            std = min(max(1.0 / math.sqrt(fan_in), 0.02), 0.2)
            t = std * torch.randn(shape, generator=gen)
        out[key] = t.to(dtype).contiguous()
    return out


def write_official_dit(path, state_dict: Mapping[str, torch.Tensor], config: Mapping,
                       num_shards: int = 1) -> Path:
    """Write config.json and the weights (single file, or `num_shards` shards + index)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    keys = sorted(state_dict)
    if num_shards <= 1:
        save_file({k: state_dict[k].contiguous() for k in keys}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        return path
    num_shards = min(num_shards, len(keys))
    per = math.ceil(len(keys) / num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        chunk = keys[i * per:(i + 1) * per]
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state_dict[k].contiguous() for k in chunk}, str(path / name), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = name
            total += state_dict[k].numel() * state_dict[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def write_tiny_dit(path, *, num_shards: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **config_kwargs) -> Path:
    """A random DiT in the official folder layout; `config_kwargs` go to `official_config`."""
    config = official_config(**config_kwargs)
    return write_official_dit(path, random_official_state_dict(config, seed, dtype), config, num_shards)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--in-channels", type=int, default=8)
    parser.add_argument("--out-channels", type=int, default=None)
    parser.add_argument("--caption-channels", type=int, nargs=2, default=[32, 16], metavar=("LLM", "CLIP"))
    parser.add_argument("--patch-size", type=int, default=1)
    parser.add_argument("--i2v", action="store_true", help="use_additional_conditions (image condition + motion score)")
    parser.add_argument("--shards", type=int, default=2, help="1 writes a single file without an index")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    out = write_tiny_dit(
        args.out_dir, num_shards=args.shards, seed=args.seed, dtype=getattr(torch, args.dtype),
        num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim, in_channels=args.in_channels,
        out_channels=args.out_channels, caption_channels=args.caption_channels, patch_size=args.patch_size,
        use_additional_conditions=args.i2v,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
