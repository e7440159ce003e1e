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
    # a LoRA run's adapter merged into its base (any TP), in the Megatron layout or (--mode export) the official one
    python examples/stepvideo/convert_ckpt_to_mm.py --source_path StepVideo-Converted --lora-load lora_save_dir \
        --target_path merged --tp_size 1 --num_layers 48 --mode merge
    # the adapter alone, peft-style with the official names (adapter_model.safetensors + adapter_config.json)
    python examples/stepvideo/convert_ckpt_to_mm.py --lora-load lora_save_dir --target_path adapter_peft \
        --mode export --save-lora-to-hf

--pp_size (also spelled --pp_sizes, as the guide's era did) takes the layer count of each pipeline stage: "48" is one
stage of 48 layers, "24 24" two. "merge" keeps MindSpeed-MM's meaning: it joins the N shards of the source and writes
them re-split for the target TP (and stages), logging "merged N shards into TP=k". --lora-load, --lora-alpha,
--lora-r and --save-lora-to-hf are MindSpeed-LLM's converter flags; r, alpha and the targets come from the adapter's
lora.json, so the flags are only checked against it. The logic lives in mindspeed_mm/checkpoint/convert.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mindspeed_mm.checkpoint.conversion_checks import ConversionError  # noqa: E402
from mindspeed_mm.checkpoint.convert import export, export_adapter, merge, split  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--source_path", help="official transformer/ folder, or a Megatron checkpoint (the base, with "
                                         "--lora-load)")
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
    g = p.add_argument_group("LoRA", "merge an adapter into the base, or export it alone (MindSpeed-LLM's flags)")
    g.add_argument("--lora-load", default=None,
                   help="a LoRA run's --save folder: merged into --source_path (merge, export) or exported alone")
    g.add_argument("--lora-alpha", type=float, default=None, help="checked against the adapter's lora.json")
    g.add_argument("--lora-r", type=int, default=None, help="checked against the adapter")
    g.add_argument("--lora-target-modules", nargs="+", default=None, help="checked against the adapter's lora.json")
    g.add_argument("--save-lora-to-hf", action="store_true",
                   help="with --mode export: write only the adapter, as adapter_model.safetensors + "
                        "adapter_config.json with the official layer names (peft's format)")
    return p


def _check_lora_flags(args) -> None:
    if args.save_lora_to_hf and (args.mode != "export" or not args.lora_load):
        raise ConversionError("--save-lora-to-hf writes an adapter alone: use it with --mode export and --lora-load.")
    if args.lora_load and args.mode == "split":
        raise ConversionError("--lora-load is merged into a Megatron-layout base: split the official folder first "
                              "(--mode split), then --mode merge (or export) with --lora-load.")
    if args.source_path is None and not args.save_lora_to_hf:
        raise ConversionError(f"--mode {args.mode} needs --source_path.")
    if args.lora_target_modules and args.lora_load:
        from mindspeed_mm.checkpoint.stepvideo_lora import read_lora_record

        recorded = (read_lora_record(args.lora_load) or {}).get("target_modules")
        if recorded is not None and sorted(recorded) != sorted(args.lora_target_modules):
            raise ConversionError(f"--lora-target-modules {args.lora_target_modules} disagree with the adapter's "
                                  f"lora.json ({recorded}); drop the flag.")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_lora_flags(args)
    lora = dict(lora_load=args.lora_load, lora_alpha=args.lora_alpha, lora_r=args.lora_r)
    if args.save_lora_to_hf:
        export_adapter(args.lora_load, args.target_path, num_heads=args.num_heads, overwrite=args.overwrite,
                       lora_alpha=args.lora_alpha, lora_r=args.lora_r)
        return 0
    if args.mode == "export":
        export(args.source_path, args.target_path, num_layers=args.num_layers, num_heads=args.num_heads,
               overwrite=args.overwrite, shard_size_gb=args.shard_size_gb, **lora)
        return 0
    if args.num_layers is None:
        raise ConversionError(f"--mode {args.mode} needs --num_layers (48 for the released model).")
    pp_layers = args.pp_size or [args.num_layers]
    if args.mode == "split":
        split(args.source_path, args.target_path, args.tp_size, pp_layers, args.num_layers,
              num_heads=args.num_heads, overwrite=args.overwrite)
    else:
        merge(args.source_path, args.target_path, args.tp_size, pp_layers, args.num_layers,
              num_heads=args.num_heads, overwrite=args.overwrite, **lora)
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
