"""Preference pairs and the score histogram from N generated videos per prompt (MindSpeed-MM's DPO data step).

Inputs: the prompt file used for inference, and the folder of generated videos, where the N samples of prompt p are
`video_{p*N}.mp4` ... `video_{p*N+N-1}.mp4` (the inference writer's naming).

1. Every expected video that exists is scored by a scorer (`scorers.py`), one raw value per metric.
2. Each metric is min-max normalised over all scored videos to [0, 1]. A metric with the same value for every video
   (including a single video) carries no preference and maps to 0.5 (MindSpeed-MM divides by zero there).
3. The score of a video is the weighted mean of its normalised metrics, in [0, 1].
4. The histogram of all scores (`histogram.compute_histogram`) goes to `video_score_histogram.json`.
5. Per prompt, the chosen video is the one with the highest score and the rejected one the lowest (the first such
   index on ties, as in MindSpeed-MM). Prompts with fewer than 2 scored videos, or whose videos all score the same, give
   no pair and are reported; it is an error only when no pair remains.
6. `data.jsonl` gets one JSON object per line: {"file": "./video_a.mp4", "file_rejected": "./video_b.mp4",
   "captions": prompt, "score": s_w, "score_rejected": s_l}. The paths are relative to the videos folder (the DPO data
   config's `data_folder`). `video_scores.json` records every video's raw and normalised metrics and score.

The three files go next to the videos folder (`<videos_path>/..`) unless another output folder is given; each is
written under a temporary name and renamed. `video_grid.mp4` is ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .histogram import DEFAULT_BIN_WIDTH, compute_histogram
from ..errors import MindSpeedMMError

DATA_NAME = "data.jsonl"
HISTOGRAM_NAME = "video_score_histogram.json"
SCORES_NAME = "video_scores.json"
GRID_NAME = "video_grid.mp4"
CONSTANT_METRIC_VALUE = 0.5
SKIP_TOO_FEW = "fewer than 2 scored videos"
SKIP_TIED = "all videos score the same"
_VIDEO_RE = re.compile(r"^video_(\d+)\.mp4$")


class PreferenceDataError(MindSpeedMMError, ValueError):
    """Inputs that cannot give preference data; the message says which and why."""


class PreferenceInputNotFoundError(MindSpeedMMError, FileNotFoundError):
    """The prompt file or the videos named on the command line are not there."""


def video_name(index: int) -> str:
    return f"video_{index}.mp4"


def read_prompt_file(path) -> List[str]:
    """The prompts, one per line, stripped, blank lines dropped: the rule the inference runner reads them by."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PreferenceInputNotFoundError(f"prompt file '{path}' does not exist; pass the prompt file used for "
                                           f"inference (--prompt_file).")
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle.read().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PreferenceDataError(f"prompt file '{path}' holds no prompt (one prompt per line).")
    return prompts


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> 'video_0..2.mp4, video_5.mp4' (compact, for messages)."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(video_name(i) if start == i else f"video_{start}..{i}.mp4")
            start = None
    shown = ", ".join(parts[:12])
    return shown + (f" and {len(parts) - 12} more ranges" if len(parts) > 12 else "")


def find_videos(videos_path, num_prompts: int, per_prompt: int) -> Tuple[Dict[int, str], List[int], List[str]]:
    """(index -> path of the expected videos present, missing indices, ignored video_{k}.mp4 names beyond the range)."""
    videos_path = os.fspath(videos_path)
    if not os.path.isdir(videos_path):
        raise PreferenceInputNotFoundError(f"videos folder '{videos_path}' does not exist (--videos_path: the "
                                           f"inference save_path).")
    expected = num_prompts * per_prompt
    present, extra = {}, []
    for name in os.listdir(videos_path):
        match = _VIDEO_RE.match(name)
        if match is None or not os.path.isfile(os.path.join(videos_path, name)):
            continue  # video_grid.mp4 and anything else
        index = int(match.group(1))
        if name != video_name(index):  # video_007.mp4
            extra.append(name)
        elif index < expected:
            present[index] = os.path.join(videos_path, name)
        else:
            extra.append(name)
    missing = [i for i in range(expected) if i not in present]
    return dict(sorted(present.items())), missing, sorted(extra)


def normalize_metric(values: Sequence[float]) -> List[float]:
    """Min-max normalisation to [0, 1]; a constant metric maps every value to 0.5."""
    values = [float(v) for v in values]
    if not values:
        return []
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise PreferenceDataError(f"a metric value is not finite ({bad[0]!r}); cannot normalise.")
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        return [CONSTANT_METRIC_VALUE] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def combine_scores(metrics: Mapping[object, Mapping[str, float]],
                   weights: Mapping[str, float]) -> Tuple[Dict[object, Dict[str, float]], Dict[object, float]]:
    """Normalise every weighted metric over all videos and take the weighted mean.

    `metrics` maps a video key to its raw metrics; returns (normalised metrics, score) per key, in `metrics`' order.
    """
    keys = list(metrics)
    names = list(weights)
    total = sum(float(weights[n]) for n in names)
    if total <= 0:
        raise PreferenceDataError("the metric weights add up to 0.")
    normalised: Dict[object, Dict[str, float]] = {k: {} for k in keys}
    for name in names:
        lacking = [k for k in keys if name not in metrics[k]]
        if lacking:
            raise PreferenceDataError(f"video {lacking[0]} has no value for metric {name!r}.")
        for k, v in zip(keys, normalize_metric([metrics[k][name] for k in keys])):
            normalised[k][name] = v
    scores = {k: sum(float(weights[n]) * normalised[k][n] for n in names) / total for k in keys}
    return normalised, scores


def select_pairs(prompts: Sequence[str], scores: Mapping[int, float],
                 per_prompt: int) -> Tuple[List[dict], Dict[int, str]]:
    """(data.jsonl rows, {prompt index: why it gave no pair}) from the scores of videos by index."""
    rows, skipped = [], {}
    for p, prompt in enumerate(prompts):
        indices = [p * per_prompt + j for j in range(per_prompt) if p * per_prompt + j in scores]
        if len(indices) < 2:
            skipped[p] = SKIP_TOO_FEW
            continue
        best = max(indices, key=lambda i: (scores[i], -i))   # first index on ties
        worst = min(indices, key=lambda i: (scores[i], i))
        if scores[best] == scores[worst]:
            skipped[p] = SKIP_TIED
            continue
        rows.append({"file": f"./{video_name(best)}", "file_rejected": f"./{video_name(worst)}", "captions": prompt,
                     "score": scores[best], "score_rejected": scores[worst]})
    return rows, skipped


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def write_json_atomic(path, obj) -> None:
    _write_atomic(Path(path), json.dumps(obj, ensure_ascii=False, indent=None) + "\n")


def write_jsonl_atomic(path, rows: Sequence[dict]) -> None:
    _write_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@dataclass
class PreferenceData:
    """What `build_preference_data` computed and wrote."""

    scorer: str
    weights: Dict[str, float]
    pairs: List[dict]
    histogram: Dict[str, object]
    scores: Dict[int, float]
    raw: Dict[int, Dict[str, float]]
    normalized: Dict[int, Dict[str, float]]
    missing: List[int] = field(default_factory=list)
    failed: Dict[int, str] = field(default_factory=dict)
    skipped: Dict[int, str] = field(default_factory=dict)
    ignored: List[str] = field(default_factory=list)
    data_path: Optional[str] = None
    histogram_path: Optional[str] = None
    scores_path: Optional[str] = None


def build_preference_data(prompt_file, videos_path, num_videos_per_prompt: int, scorer,
                          bin_width: float = DEFAULT_BIN_WIDTH, output_dir=None, progress: bool = False,
                          log: Callable[[str], None] = print, prompts: Optional[Sequence[str]] = None
                          ) -> PreferenceData:
    """Score the videos, write `data.jsonl`, `video_score_histogram.json` and `video_scores.json`; see the module doc.

    `scorer` is an `OfflineScorer` or `VBenchScorer` (anything with `name`, `weights` and `score_videos`). `prompts`:
    the prompts themselves instead of `prompt_file` (the guide-era `--prompt`: one prompt for every video).
    """
    if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) \
            or num_videos_per_prompt < 2:
        raise PreferenceDataError(f"--num_inference_videos_per_sample must be an integer >= 2 (a pair needs two "
                                  f"videos of one prompt), got {num_videos_per_prompt!r}.")
    n = num_videos_per_prompt
    prompts = list(prompts) if prompts is not None else read_prompt_file(prompt_file)
    videos_path = os.fspath(videos_path)
    present, missing, ignored = find_videos(videos_path, len(prompts), n)
    out_dir = Path(output_dir) if output_dir is not None else Path(videos_path).resolve().parent
    if not present:
        raise PreferenceInputNotFoundError(
            f"videos folder '{videos_path}' holds none of the expected video_0.mp4 .. "
            f"{video_name(len(prompts) * n - 1)} ({len(prompts)} prompts x {n} videos).")
    if missing:
        log(f"warning: {len(missing)} of {len(prompts) * n} expected videos are missing from '{videos_path}': "
            f"{_ranges(missing)}")
    if ignored:
        log(f"warning: ignoring {len(ignored)} video file(s) outside video_0.mp4 .. {video_name(len(prompts) * n - 1)}"
            f" ({', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}); does --prompt_file or "
            f"--num_inference_videos_per_sample differ from the inference run?")
    out_dir.mkdir(parents=True, exist_ok=True)

    paths = list(present.values())
    by_path = {path: index for index, path in present.items()}
    raw_by_path, failed_by_path = scorer.score_videos(paths, work_dir=str(out_dir / "evaluation_results"),
                                                      progress=progress)
    failed = {by_path[p]: reason for p, reason in failed_by_path.items()}
    for index, reason in sorted(failed.items()):
        log(f"warning: {video_name(index)} was not scored: {reason}")
    raw = {by_path[p]: dict(m) for p, m in raw_by_path.items()}
    raw = dict(sorted(raw.items()))
    if not raw:
        raise PreferenceDataError(f"no video in '{videos_path}' could be scored (see the warnings above).")

    normalized, scores = combine_scores(raw, scorer.weights)
    histogram = compute_histogram(list(scores.values()), bin_width)
    pairs, skipped = select_pairs(prompts, scores, n)
    if skipped:
        reasons: Dict[str, List[int]] = {}
        for p, why in skipped.items():
            reasons.setdefault(why, []).append(p)
        detail = "; ".join(f"{why}: {len(ps)} (first: prompt #{ps[0] + 1})" for why, ps in reasons.items())
        log(f"warning: {len(skipped)} of {len(prompts)} prompt(s) give no pair ({detail}; prompts counted in file "
            f"order without blank lines).")
    if not pairs:
        raise PreferenceDataError(f"no preference pair remains: every one of the {len(prompts)} prompt(s) has fewer "
                                  f"than 2 scored videos or videos that all score the same (see the warnings above).")

    result = PreferenceData(scorer=scorer.name, weights=dict(scorer.weights), pairs=pairs, histogram=histogram,
                            scores=scores, raw=raw, normalized=normalized, missing=missing, failed=failed,
                            skipped=skipped, ignored=ignored)
    result.histogram_path = str(out_dir / HISTOGRAM_NAME)
    result.data_path = str(out_dir / DATA_NAME)
    result.scores_path = str(out_dir / SCORES_NAME)
    write_json_atomic(result.histogram_path, histogram)
    write_jsonl_atomic(result.data_path, pairs)
    write_json_atomic(result.scores_path, {
        "scorer": scorer.name,
        "weights": result.weights,
        "normalization": f"min-max over all scored videos; a constant metric maps to {CONSTANT_METRIC_VALUE}",
        "videos": {video_name(i): {"raw": raw[i], "normalized": normalized[i], "score": scores[i]} for i in raw},
    })
    return result
