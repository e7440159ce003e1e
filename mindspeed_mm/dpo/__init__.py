"""DPO post-training: video scorers, the score histogram and preference pairs (see docs/dpo.md)."""

from .histogram import (HISTOGRAM_FIELDS, HistogramError, compute_histogram, load_histogram, pair_weight,
                        score_probability)
from .pairs import PreferenceData, PreferenceDataError, build_preference_data
from .scorers import OfflineScorer, ScoringError, VBenchScorer, build_scorer, vbench_status

__all__ = [
    "HISTOGRAM_FIELDS", "HistogramError", "compute_histogram", "load_histogram", "pair_weight", "score_probability",
    "PreferenceData", "PreferenceDataError", "build_preference_data",
    "OfflineScorer", "ScoringError", "VBenchScorer", "build_scorer", "vbench_status",
]
