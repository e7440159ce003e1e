"""Convert StepVideo DiT checkpoints between the official layout and Megatron's (TP/PP), both ways.

    # official transformer/ -> Megatron layout for TP 2 (one pipeline stage of 48 layers)
    python examples/stepvideo/convert_ckpt_to_mm.py --source_path weights/transformer \
        --target_path StepVideo-Converted --tp_size 2 --pp_size 48 --num_layers 48 --mode split
    # a trained or converted Megatron checkpoint (any TP/PP) -> all shards joined and re-split for --tp_size
    python examples/stepvideo/convert_ckpt_to_mm.py --source_path save_dir --target_path merged \
        --tp_size 1 --pp_size 48 --num_layers 48 --mode merge
    # a Megatron checkpoint -> the official diffusers folder
    python examples/stepvideo/convert_ckpt_to_mm.py --source_path save_dir --target_path transformer_out \
        --num_layers 48 --mode export

--pp_size (also spelled --pp_sizes, as the guide's era did) takes the layer count of each pipeline stage: "48" is one
stage of 48 layers, "24 24" two. "merge" keeps MindSpeed-MM's meaning: it joins the N shards of the source and writes
them re-split for the target TP (and stages), logging "merged N shards into TP=k". The logic lives in
mindspeed_mm/checkpoint/convert.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mindspeed_mm.checkpoint.conversion_checks import ConversionError  # noqa: E402
from mindspeed_mm.checkpoint.convert import export, merge, split  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--source_path", required=True, help="official transformer/ folder, or a Megatron checkpoint")
    p.add_argument("--target_path", required=True, help="output folder (must be new or empty, unless --overwrite)")
    p.add_argument("--mode", required=True, choices=["split", "merge", "export"],
                   help="split: official transformer/ -> Megatron layout at --tp_size. merge: a Megatron checkpoint "
                        "of any TP x PP -> all its shards joined and re-split for --tp_size (MindSpeed-MM's merge: "
                        "the target TP, not always 1). export: Megatron layout -> official folder")
    p.add_argument("--tp_size", type=int, default=1, help="target tensor-parallel size (split, merge)")
    p.add_argument("--pp_size", "--pp_sizes", dest="pp_size", type=int, nargs="+", default=None,
                   help="target layers per pipeline stage, e.g. 48, or 24 24 (split, merge); default one stage. "
                        "--pp_sizes is the guide-era spelling")
    p.add_argument("--num_layers", type=int, default=None, help="transformer layers in the checkpoint (48)")
    p.add_argument("--num_heads", type=int, default=None, help="attention heads, checked against the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --target_path once done")
    p.add_argument("--shard_size_gb", type=float, default=10.0, help="export: maximum size of one safetensors file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "export":
        export(args.source_path, args.target_path, num_layers=args.num_layers, num_heads=args.num_heads,
               overwrite=args.overwrite, shard_size_gb=args.shard_size_gb)
        return 0
    if args.num_layers is None:
        raise ConversionError(f"--mode {args.mode} needs --num_layers (48 for the released model).")
    pp_layers = args.pp_size or [args.num_layers]
    convert = split if args.mode == "split" else merge
    convert(args.source_path, args.target_path, args.tp_size, pp_layers, args.num_layers,
            num_heads=args.num_heads, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
