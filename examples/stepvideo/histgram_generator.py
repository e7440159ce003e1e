"""Score the generated videos and write the DPO preference data (生成偏好数据集).

    python examples/stepvideo/histgram_generator.py --prompt_file examples/stepvideo/t2v/samples_prompts.txt \
        --videos_path dpo_samples/videos --num_inference_videos_per_sample 4

Reads `<videos_path>/video_{i}.mp4` (prompt p's samples are video_{p*N} .. video_{p*N+N-1}; video_grid.mp4 is ignored)
and writes, next to the videos folder (`<videos_path>/..`) unless --output_dir says otherwise:

    data.jsonl                   one chosen/rejected pair per prompt (JSON lines; paths relative to the videos folder)
    video_score_histogram.json   the score histogram the DPO pair weight uses (the model JSON's dpo.histogram_path)
    video_scores.json            every video's raw and normalised metrics and score

--scorer vbench runs MindSpeed-MM's VBench dimensions (VBench must be installed with its checkpoints cached);
--scorer offline uses the built-in weight-free metrics (temporal_consistency, motion_smoothness_interp, sharpness),
which are not VBench dimensions. The default picks VBench when usable, else offline, and says which. See docs/dpo.md.

The guide-era flags are accepted: --num_inference_videos_per_sample defaults to 3, as it did; --prompt gives the one
prompt of every video instead of --prompt_file; --full_json_dir and --imaging_quality_preprocessing_mode go to VBench;
--mode custom_input and --read_frame false are what this script does (other values are errors); --load_ckpt_from_local
and --category have no effect (VBench reads only its cached checkpoints) and are named in a notice.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mindspeed_mm.cli import notice  # noqa: E402
from mindspeed_mm.dpo.histogram import DEFAULT_BIN_WIDTH  # noqa: E402
from mindspeed_mm.dpo.pairs import build_preference_data  # noqa: E402
from mindspeed_mm.dpo.scorers import SCORER_CHOICES, ScoringError, build_scorer, vbench_status  # noqa: E402


def parse_weights(items):
    if not items:
        return None
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ScoringError(f"--weights takes NAME=VALUE items, got {item!r}.")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ScoringError(f"--weights: {value!r} (for {name}) is not a number.") from None
    return weights


def era_bool(text: str) -> bool:
    """The guide-era switches took a value (`--read_frame False`); read it as the boolean it spells."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", "none", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


IQ_MODES = ("shorter", "longer", "shorter_centercrop", "None")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--prompt_file", default=None, help="the prompt file used for inference (one prompt per line)")
    p.add_argument("--videos_path", required=True, help="the folder of generated videos (inference save_path)")
    p.add_argument("--num_inference_videos_per_sample", type=int, default=3,
                   help="videos generated per prompt (inference num_inference_videos_per_sample, >= 2; default 3)")
    p.add_argument("--scorer", choices=SCORER_CHOICES, default="auto",
                   help="vbench, offline, or auto (default): vbench when installed with its checkpoints, else offline")
    p.add_argument("--bin_width", type=float, default=DEFAULT_BIN_WIDTH, help="histogram bin width (default 0.1)")
    p.add_argument("--weights", nargs="+", metavar="NAME=VALUE", default=None,
                   help="metric weights of the chosen scorer (default: 1.0 each offline, 4.0 each for VBench); "
                        "metrics left out get weight 0")
    p.add_argument("--output_dir", default=None, help="where to write the files (default: <videos_path>/..)")
    p.add_argument("--video_reader_type", choices=["DecordVideo", "PyAVVideo"], default="DecordVideo",
                   help="offline scorer's video reader (DecordVideo falls back to PyAV without decord)")
    p.add_argument("--device", default=None, help="VBench device (default: cuda, else npu, else cpu)")
    g = p.add_argument_group("guide-era flags")
    g.add_argument("--prompt", default=None,
                   help="the one prompt of every video, instead of --prompt_file (the era's default 'None': unset)")
    g.add_argument("--full_json_dir", default=None, help="VBench's full-info JSON (its custom_input mode ignores it)")
    g.add_argument("--imaging_quality_preprocessing_mode", choices=IQ_MODES, default=None,
                   help="VBench imaging_quality preprocessing (default longer)")
    g.add_argument("--mode", choices=["custom_input", "vbench_standard", "vbench_category"], default="custom_input",
                   help="only custom_input: the generated videos are scored against each other")
    g.add_argument("--read_frame", type=era_bool, default=False, help="only false: the videos are read as videos")
    g.add_argument("--load_ckpt_from_local", type=era_bool, default=None,
                   help="no effect: VBench reads only its cached checkpoints and never downloads")
    g.add_argument("--category", default=None, help="no effect: only for --mode vbench_category")
    return p


def era_options(args, scorer_name: str) -> dict:
    """VBench options from the guide-era flags; refuses what cannot be done and notices what has no effect."""
    if args.mode != "custom_input":
        raise ScoringError(f"--mode {args.mode} scores VBench's own prompt suite, not the generated videos of each "
                           f"prompt; preference pairs need --mode custom_input (the default).")
    if args.read_frame:
        raise ScoringError("--read_frame true reads folders of frames; the generated videos are .mp4 files: drop "
                           "the flag or pass --read_frame false.")
    idle = []
    if args.category is not None:
        idle.append("--category (only for --mode vbench_category)")
    if args.load_ckpt_from_local is not None:
        idle.append("--load_ckpt_from_local (VBench reads only its cached checkpoints, never downloads)")
    options = {}
    for flag in ("full_json_dir", "imaging_quality_preprocessing_mode"):
        value = getattr(args, flag)
        if value is None:
            continue
        if scorer_name == "vbench":
            options[flag if flag != "full_json_dir" else "full_info_dir"] = value
        else:
            idle.append(f"--{flag} (a VBench setting; the {scorer_name} scorer is used)")
    if idle:
        notice("flags with no effect here: " + "; ".join(idle))
    return options


def read_prompts(args):
    """(prompt_file, prompts): the prompt file, or the one --prompt (the era's 'None' means unset)."""
    prompt = None if args.prompt in (None, "None") else args.prompt
    if prompt is not None and args.prompt_file is not None:
        raise ScoringError("--prompt and --prompt_file are mutually exclusive: give the prompt file used for "
                           "inference, or --prompt when every video was generated from that one prompt.")
    if prompt is None and args.prompt_file is None:
        raise ScoringError("give --prompt_file, the prompt file used for inference (the inference JSON's prompt).")
    return args.prompt_file, None if prompt is None else [prompt]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    weights = parse_weights(args.weights)
    prompt_file, prompts = read_prompts(args)
    kind = args.scorer if args.scorer != "auto" else ("vbench" if vbench_status()[0] else "offline")
    options = era_options(args, kind)
    scorer, why = build_scorer(args.scorer, weights, reader_type=args.video_reader_type, device=args.device,
                               **options)
    print(f"scorer: {scorer.name} ({why}); weights: "
          + ", ".join(f"{k}={v:g}" for k, v in scorer.weights.items()), flush=True)
    if scorer.name == "offline":
        print("note: the offline metrics are weight-free signal measures, not VBench dimensions.", flush=True)
    result = build_preference_data(prompt_file, args.videos_path, args.num_inference_videos_per_sample, scorer,
                                   bin_width=args.bin_width, output_dir=args.output_dir, progress=sys.stderr.isatty(),
                                   prompts=prompts)
    h = result.histogram
    print(f"scored {len(result.scores)} video(s); {len(result.pairs)} pair(s) written to {result.data_path}")
    print(f"histogram ({h['total_num']} scores, bins {h['min_bin']}..{h['max_bin'] - 1} of width {h['bin_width']}) "
          f"written to {result.histogram_path}")
    print(f"per-video scores written to {result.scores_path}")
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
