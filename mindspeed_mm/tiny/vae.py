"""Write a (tiny) StepVideo Video-VAE with random weights in the official single-file layout.

    python -m mindspeed_mm.tiny.vae OUT.safetensors [--version 2 --z-channels 8 --encoder-ch 32 ...]

The file is what `vae/vae_v2.safetensors` (or `vae/vae.safetensors` for version 1) of the
official download looks like: one safetensors file with the official tensor names, including
the decoder's last convolution stored as `decoder.conv_out.{weight,bias}`. Official files carry
no config, so the widths used are printed (as the `ae` section of a model JSON) and must be
given to `StepVideoVAE` / `AEConfig` when loading.

Every tensor is random (none at its default), drawn from a seed: GroupNorm weights
1 + 0.1·N(0,1), biases 0.05·N(0,1), convolution kernels N(0, s²) with
s = clamp(1/sqrt(fan_in), lo, hi), (lo, hi) = (0.02, 0.2) by default as in the golden cases.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

TINY_VAE_CONFIG: Dict = {
    "version": 2,
    "z_channels": 8,
    "encoder_ch": 32,
    "encoder_ch_mult": (1, 1, 1, 1),
    "decoder_ch": 32,
    "decoder_ch_mult": (1, 1, 1, 1),
    "num_res_blocks": 1,
}


@torch.no_grad()
def init_random_weights(module: torch.nn.Module, seed: int = 0,
                        std_range: Tuple[float, float] = (0.02, 0.2)) -> torch.nn.Module:
    """Fill every parameter of a StepVideoVAE (or any conv/GroupNorm module) from `seed`, in place.

    `std_range` clamps the kernel std 1/sqrt(fan_in); (0.0, inf) keeps it variance-preserving,
    which keeps activations of the real-width VAE of order one.
    """
    gen = torch.Generator().manual_seed(seed)
    lo, hi = std_range
    for name, param in sorted(module.named_parameters()):
        shape = tuple(param.shape)
        if len(shape) == 1:
            is_norm_weight = name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen) if is_norm_weight else \
                0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            std = min(max(1.0 / math.sqrt(fan_in), lo), hi)
            value = std * torch.randn(shape, generator=gen)
        param.copy_(value.to(param.dtype))
    return module


def random_official_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16,
                               std_range: Tuple[float, float] = (0.02, 0.2), **arch) -> Dict[str, torch.Tensor]:
    """Random tensors under the official on-disk names of a VAE with constructor keys `arch`."""
    from mindspeed_mm.models.ae import StepVideoVAE

    vae = StepVideoVAE(device="cpu", dtype=torch.float32, **arch)
    init_random_weights(vae, seed, std_range)
    return {k: v.to(dtype).contiguous() for k, v in vae.official_state_dict().items()}


def write_vae_weights(path, seed: int = 0, dtype: torch.dtype = torch.float16,
                      config: Optional[Dict] = None) -> Dict:
    """Write a random VAE to `path` (a .safetensors file, or a folder that gets the official file name).

    Returns the `ae` config section (model_id, from_pretrained and the constructor keys) that loads it.
    """
    from safetensors.torch import save_file

    from mindspeed_mm.models.ae.checkpoint import WEIGHT_FILES

    arch = dict(TINY_VAE_CONFIG if config is None else config)
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHT_FILES[arch.get("version", 2)]
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tensors = random_official_state_dict(seed=seed, dtype=dtype, **arch)
    save_file(tensors, str(path), metadata={"format": "pt"})
    section = {"model_id": "stepvideovae", "from_pretrained": str(path), "frame_len": 17}
    section.update({k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()})
    return section


def smooth_video(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth moving colour pattern in [-0.8, 0.8], (1, T, 3, H, W): the test and benchmark input."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    channels = [torch.sin(2 * math.pi * (x + 0.5 * y + 0.3 * t)), torch.cos(2 * math.pi * (0.7 * x - y + 0.2 * t)),
                torch.sin(math.pi * (x * y + t))]
    return 0.8 * torch.stack(channels, dim=1)[None]


def _mult(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output .safetensors file, or a folder (gets vae_v2.safetensors / vae.safetensors)")
    parser.add_argument("--version", type=int, default=TINY_VAE_CONFIG["version"], choices=(1, 2))
    parser.add_argument("--z-channels", type=int, default=TINY_VAE_CONFIG["z_channels"])
    parser.add_argument("--encoder-ch", type=int, default=TINY_VAE_CONFIG["encoder_ch"])
    parser.add_argument("--encoder-ch-mult", type=_mult, default=TINY_VAE_CONFIG["encoder_ch_mult"],
                        help="comma-separated, 4 levels")
    parser.add_argument("--decoder-ch", type=int, default=TINY_VAE_CONFIG["decoder_ch"])
    parser.add_argument("--decoder-ch-mult", type=_mult, default=TINY_VAE_CONFIG["decoder_ch_mult"])
    parser.add_argument("--num-res-blocks", type=int, default=TINY_VAE_CONFIG["num_res_blocks"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp16", help="on-disk dtype: fp16 (default), bf16 or fp32")
    args = parser.parse_args(argv)
    from mindspeed_mm.config.model import torch_dtype

    config = {
        "version": args.version, "z_channels": args.z_channels, "encoder_ch": args.encoder_ch,
        "encoder_ch_mult": args.encoder_ch_mult, "decoder_ch": args.decoder_ch,
        "decoder_ch_mult": args.decoder_ch_mult, "num_res_blocks": args.num_res_blocks,
    }
    section = write_vae_weights(args.out, seed=args.seed, dtype=torch_dtype(args.dtype), config=config)
    print(json.dumps({"ae": section}, indent=4))


if __name__ == "__main__":
    main()
