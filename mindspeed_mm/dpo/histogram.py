"""The score histogram of the DPO preference data (`video_score_histogram.json`) and the pair weight built on it.

The format is MindSpeed-MM's (`histogram_generator.py`, normalised case):

    {"0.0-0.1": 1, "0.1-0.2": 0, "0.2-0.30000000000000004": 1, ..., "0.9-1.0": 1,
     "total_num": 4, "max_num": 1, "min_bin": 0, "max_bin": 10, "bin_width": 0.1, "bin_size": 10}

- w = `bin_width` (0.1 for normalised scores). `min_bin = floor(min / w)`, `max_bin = ceil(max / w)`.
- One key per bin index k in range(min_bin, max_bin): the Python float strings f"{k * w}-{k * w + w}" (so bin 3 of
  width 0.1 is "0.30000000000000004-0.4"), mapped to its count.
- A score s goes to bin floor(s / w); a score on the top edge (s / w == max_bin, e.g. 1.0) goes to the last bin,
  max_bin - 1. Note that floor(0.3 / 0.1) is 2 in floating point: the bin of a score is defined by that
  computation, not by the printed key, and `score_probability` uses the very same rule.
- `total_num` = number of scores, `max_num` = largest bin count, `bin_size` = max_bin - min_bin.

Two departures from MindSpeed-MM, both for inputs it cannot handle:

- When every score has the same bin index and sits exactly on a bin edge (e.g. all scores 0.5, which happens when every
  score dimension is constant), floor(min / w) == ceil(max / w) and MindSpeed-MM builds no bin at all (then fails with a
  KeyError). Here max_bin becomes min_bin + 1: one bin holding every score.
- MindSpeed-MM's DPO lookup (rl/utils.py) rebuilds the key from floor(s / w) without the top-edge rule, so the video
  with the top score gets probability 0 and the weight cap 1e3 ** alpha. `score_probability` applies the same top-edge
  rule as the histogram, so every score the histogram counted has a non-zero probability.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, Optional
from ..errors import MindSpeedMMError

HISTOGRAM_FIELDS = ("total_num", "max_num", "min_bin", "max_bin", "bin_width", "bin_size")
DEFAULT_BIN_WIDTH = 0.1
MIN_PAIR_PROBABILITY = 1e-3  # the floor of sqrt(P(s_w)·P(s_l)) in the pair weight, as in MindSpeed-MM


class HistogramNotFoundError(MindSpeedMMError, FileNotFoundError):
    """The score histogram file is not where the config says."""


class HistogramError(MindSpeedMMError, ValueError):
    """A histogram that cannot be built or a histogram file that is not valid; the message says why."""


def bin_key(index: int, bin_width: float) -> str:
    """The key of bin `index`: MindSpeed-MM's f"{lower}-{upper}" with Python float reprs."""
    lower = index * bin_width
    return f"{lower}-{lower + bin_width}"


def _check_width(bin_width) -> float:
    if isinstance(bin_width, bool) or not isinstance(bin_width, (int, float)):
        raise HistogramError(f"bin_width must be a number, got {bin_width!r}.")
    if not math.isfinite(bin_width) or bin_width <= 0:
        raise HistogramError(f"bin_width must be a positive finite number, got {bin_width!r}.")
    return float(bin_width)


def _check_score(score) -> float:
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        try:
            score = float(score)  # numpy / 0-d torch scalars
        except (TypeError, ValueError):
            raise HistogramError(f"a score must be a number, got {score!r}.") from None
    score = float(score)
    if not math.isfinite(score):
        raise HistogramError(f"a score must be finite, got {score!r}.")
    return score


def bin_index(score: float, bin_width: float, max_bin: int) -> int:
    """floor(score / bin_width), with a score exactly on the top edge (score / bin_width == max_bin) moved into the
    last bin. A score above the top edge keeps its index (>= max_bin: outside the histogram)."""
    quotient = score / bin_width
    index = math.floor(quotient)
    return max_bin - 1 if quotient == max_bin else index


def compute_histogram(scores: Iterable[float], bin_width: float = DEFAULT_BIN_WIDTH) -> Dict[str, object]:
    """The histogram dict of `scores` (see the module docstring for the exact keys and fields)."""
    width = _check_width(bin_width)
    values = [_check_score(s) for s in scores]
    if not values:
        raise HistogramError("cannot build a score histogram from no scores.")
    min_bin = math.floor(min(values) / width)
    max_bin = math.ceil(max(values) / width)
    if max_bin <= min_bin:  # every score on one bin edge: keep one bin (MindSpeed-MM would build none)
        max_bin = min_bin + 1
    counts = [0] * (max_bin - min_bin)
    for s in values:
        counts[bin_index(s, width, max_bin) - min_bin] += 1
    histogram: Dict[str, object] = {bin_key(k, width): counts[k - min_bin] for k in range(min_bin, max_bin)}
    if len(histogram) != len(counts):  # two bins printing alike: only possible for absurd widths
        raise HistogramError(f"bin_width {width!r} gives bins whose keys print alike; use a larger width.")
    histogram.update({"total_num": len(values), "max_num": max(counts), "min_bin": min_bin, "max_bin": max_bin,
                      "bin_width": width, "bin_size": max_bin - min_bin})
    return histogram


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_histogram(histogram, source: str = "the histogram") -> Dict[str, object]:
    """Check a histogram dict's fields, bins and counts; returns it. `source` names it in errors (e.g. a path)."""
    if not isinstance(histogram, dict):
        raise HistogramError(f"{source}: expected a JSON object, got {type(histogram).__name__}.")
    missing = [f for f in HISTOGRAM_FIELDS if f not in histogram]
    if missing:
        raise HistogramError(f"{source}: missing field(s) {', '.join(missing)}; a score histogram holds "
                             f"{', '.join(HISTOGRAM_FIELDS)} and one count per bin.")
    for name in ("total_num", "max_num", "min_bin", "max_bin", "bin_size"):
        if not _is_int(histogram[name]):
            raise HistogramError(f"{source}: field {name} must be an integer, got {histogram[name]!r}.")
    try:
        width = _check_width(histogram["bin_width"])
    except HistogramError as exc:
        raise HistogramError(f"{source}: {exc}") from None
    min_bin, max_bin = histogram["min_bin"], histogram["max_bin"]
    if max_bin <= min_bin:
        raise HistogramError(f"{source}: max_bin ({max_bin}) must be larger than min_bin ({min_bin}).")
    if histogram["bin_size"] != max_bin - min_bin:
        raise HistogramError(f"{source}: bin_size is {histogram['bin_size']} but max_bin - min_bin is "
                             f"{max_bin - min_bin}.")
    expected = [bin_key(k, width) for k in range(min_bin, max_bin)]
    bins = {k: v for k, v in histogram.items() if k not in HISTOGRAM_FIELDS}
    absent = [k for k in expected if k not in bins]
    extra = [k for k in bins if k not in set(expected)]
    if absent or extra:
        detail = []
        if absent:
            detail.append(f"missing bin(s) {', '.join(absent[:5])}")
        if extra:
            detail.append(f"unexpected key(s) {', '.join(extra[:5])}")
        raise HistogramError(f"{source}: the bins do not match min_bin {min_bin}, max_bin {max_bin} and bin_width "
                             f"{width!r} ({'; '.join(detail)}).")
    counts = [bins[k] for k in expected]
    bad = [k for k, c in zip(expected, counts) if not _is_int(c) or c < 0]
    if bad:
        raise HistogramError(f"{source}: bin {bad[0]!r} has count {bins[bad[0]]!r}; counts are non-negative integers.")
    if sum(counts) != histogram["total_num"]:
        raise HistogramError(f"{source}: the bin counts add up to {sum(counts)} but total_num is "
                             f"{histogram['total_num']}.")
    if histogram["total_num"] <= 0:
        raise HistogramError(f"{source}: total_num is {histogram['total_num']}; the histogram counts no score.")
    if max(counts) != histogram["max_num"]:
        raise HistogramError(f"{source}: the largest bin count is {max(counts)} but max_num is "
                             f"{histogram['max_num']}.")
    return histogram


def load_histogram(path) -> Dict[str, object]:
    """Read and validate a `video_score_histogram.json`; every error names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise HistogramNotFoundError(f"score histogram '{path}' does not exist; write it with "
                                f"examples/stepvideo/histgram_generator.py (see docs/dpo.md).")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HistogramError(f"score histogram '{path}' is not valid JSON ({exc}).") from None
    return validate_histogram(data, f"score histogram '{path}'")


def score_probability(histogram: Dict[str, object], score: float) -> float:
    """P(s) = count of the bin holding `score` / total_num; 0 for a score outside [min_bin, max_bin] * bin_width.

    The bin is found exactly as `compute_histogram` places scores, top edge included.
    """
    width = float(histogram["bin_width"])
    min_bin, max_bin = int(histogram["min_bin"]), int(histogram["max_bin"])
    index = bin_index(_check_score(score), width, max_bin)
    if index < min_bin or index >= max_bin:
        return 0.0
    return histogram.get(bin_key(index, width), 0) / histogram["total_num"]


def pair_weight(histogram: Dict[str, object], score_w: float, score_l: float, alpha: float,
                beta: Optional[float] = None) -> float:
    """The DPO pair weight (beta_w / max(sqrt(P(s_w)·P(s_l)), 1e-3)) ** alpha.

    beta_w is `beta`, or max_num / total_num (the probability of the fullest bin) when `beta` is None. alpha = 0 (the
    recipe's default) gives 1 for every pair. Rare pairs (low probability) get weights above 1 for alpha > 0.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise HistogramError(f"weight alpha (dpo.weight_alpha) must be finite, got {alpha!r}.")
    if beta is None:
        beta_w = histogram["max_num"] / histogram["total_num"]
    else:
        beta_w = float(beta)
        if not math.isfinite(beta_w) or beta_w <= 0:
            raise HistogramError(f"weight beta (dpo.weight_beta) must be a positive number or null, got {beta!r}.")
    p = math.sqrt(score_probability(histogram, score_w) * score_probability(histogram, score_l))
    return (beta_w / max(p, MIN_PAIR_PROBABILITY)) ** alpha
