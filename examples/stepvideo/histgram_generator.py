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
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mindspeed_mm.dpo.histogram import DEFAULT_BIN_WIDTH  # noqa: E402
from mindspeed_mm.dpo.pairs import build_preference_data  # noqa: E402
from mindspeed_mm.dpo.scorers import SCORER_CHOICES, ScoringError, build_scorer  # noqa: E402


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--prompt_file", required=True, help="the prompt file used for inference (one prompt per line)")
    p.add_argument("--videos_path", required=True, help="the folder of generated videos (inference save_path)")
    p.add_argument("--num_inference_videos_per_sample", type=int, required=True,
                   help="videos generated per prompt (inference num_inference_videos_per_sample, >= 2)")
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    weights = parse_weights(args.weights)
    scorer, why = build_scorer(args.scorer, weights, reader_type=args.video_reader_type, device=args.device)
    print(f"scorer: {scorer.name} ({why}); weights: "
          + ", ".join(f"{k}={v:g}" for k, v in scorer.weights.items()), flush=True)
    if scorer.name == "offline":
        print("note: the offline metrics are weight-free signal measures, not VBench dimensions.", flush=True)
    result = build_preference_data(args.prompt_file, args.videos_path, args.num_inference_videos_per_sample, scorer,
                                   bin_width=args.bin_width, output_dir=args.output_dir, progress=sys.stderr.isatty())
    h = result.histogram
    print(f"scored {len(result.scores)} video(s); {len(result.pairs)} pair(s) written to {result.data_path}")
    print(f"histogram ({h['total_num']} scores, bins {h['min_bin']}..{h['max_bin'] - 1} of width {h['bin_width']}) "
          f"written to {result.histogram_path}")
    print(f"per-video scores written to {result.scores_path}")
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
