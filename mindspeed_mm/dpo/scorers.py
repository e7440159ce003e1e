"""Video scorers for the DPO preference data: a weight-free offline scorer, and VBench when it is usable.

Offline scorer (`OfflineScorer`, no model weights). Its metrics are simple signal measures with their own names; they
are NOT VBench dimensions and their values are not comparable with VBench scores. All are "higher is better":

- `temporal_consistency`: the mean, over consecutive frame pairs, of the Pearson correlation (cosine similarity of the
  mean-removed pixels) of their luma, downsampled to at most `analysis_size` px on the long side. In [-1, 1]; flicker
  and frame-to-frame noise lower it. A pair of flat frames counts 1 when their levels agree within 1/255, else 0; a
  flat frame next to a textured one counts 0.
- `motion_smoothness_interp`: 1 - the mean absolute error (luma in [0, 1], same resolution) of predicting frame t by
  the average of frames t-1 and t+1, over t = 1..T-2. In [0, 1]; jerky or flickering motion lowers it. It follows the
  idea of VBench's motion_smoothness (frame interpolation error) with a linear blend instead of the AMT network.
- `sharpness`: the variance of the 4-neighbour Laplacian of the luma (in [0, 1], native resolution, no padding),
  averaged over frames. >= 0; blur lowers it (noise raises it, which temporal_consistency penalises).

Luma is BT.601 (0.299 R + 0.587 G + 0.114 B). Static videos score high on both temporal metrics, as they do in VBench's
consistency dimensions. The default weights are 1.0 each; the combined score is the weighted mean of the min-max
normalised metrics (see `pairs.py`).

VBench scorer (`VBenchScorer`): MindSpeed-MM's recipe, the dimensions subject_consistency, background_consistency,
motion_smoothness, aesthetic_quality and imaging_quality with weight 4.0 each, run in VBench's `custom_input` mode with
local checkpoints only (VBench would otherwise download them). It is used only when `vbench` is importable and every
checkpoint file those dimensions need is in VBench's cache (VBENCH_CACHE_DIR, default ~/.cache/vbench); this project
does not install VBench.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from ..errors import MindSpeedMMError

logger = logging.getLogger(__name__)

OFFLINE_METRICS = ("temporal_consistency", "motion_smoothness_interp", "sharpness")
DEFAULT_OFFLINE_WEIGHTS = {name: 1.0 for name in OFFLINE_METRICS}
VBENCH_DIMENSIONS = ("subject_consistency", "background_consistency", "motion_smoothness", "aesthetic_quality",
                     "imaging_quality")
DEFAULT_VBENCH_WEIGHTS = {name: 4.0 for name in VBENCH_DIMENSIONS}  # MindSpeed-MM's (VideoDPO's) weights
VBENCH_RUN_NAME = "StepVideoDPO"
SCORER_CHOICES = ("auto", "offline", "vbench")

_LUMA = (0.299, 0.587, 0.114)
_FLAT_STD = 1e-4          # a frame whose luma std is below this (in [0, 1] units) is flat
_FLAT_LEVEL = 1.0 / 255   # two flat frames agree when their levels differ by less than one 8-bit level
_CHUNK = 16               # frames converted to float at a time


class ScoringError(MindSpeedMMError, ValueError):
    """A scorer that cannot be built or run as asked; the message says what to do."""


def check_weights(weights: Mapping[str, float], metrics: Sequence[str]) -> Dict[str, float]:
    """Validate metric weights: known names, finite, >= 0, not all 0. Missing metrics get weight 0."""
    unknown = [k for k in weights if k not in metrics]
    if unknown:
        raise ScoringError(f"unknown metric(s) {', '.join(map(str, unknown))} in the weights; this scorer has "
                           f"{', '.join(metrics)}.")
    out = {}
    for name in metrics:
        value = weights.get(name, 0.0)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ScoringError(f"the weight of {name} must be a number, got {value!r}.") from None
        if not math.isfinite(value) or value < 0:
            raise ScoringError(f"the weight of {name} must be a finite number >= 0, got {value!r}.")
        out[name] = value
    if sum(out.values()) <= 0:
        raise ScoringError(f"at least one metric weight must be positive (got {out}).")
    return out


# ----------------------------------------------------------------------------------------------- offline metrics

def luma(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (T, H, W, 3) -> float32 luma (T, H, W) in [0, 1]."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames (T, H, W, 3), got shape {tuple(frames.shape)}.")
    out = []
    weights = torch.tensor(_LUMA, dtype=torch.float32)
    for start in range(0, frames.shape[0], _CHUNK):
        chunk = frames[start:start + _CHUNK].to(torch.float32)
        out.append((chunk @ weights) / 255.0)
    return torch.cat(out)


def downsample(y: torch.Tensor, max_side: int) -> torch.Tensor:
    """Area-downsample (T, H, W) so that the long side is at most `max_side` (never upsamples)."""
    h, w = y.shape[-2:]
    if max(h, w) <= max_side:
        return y
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(y.unsqueeze(1), size=size, mode="area").squeeze(1)


def temporal_consistency(y: torch.Tensor) -> float:
    """Mean Pearson correlation of consecutive frames of luma (T, H, W); see the module docstring."""
    if y.shape[0] < 2:
        raise ValueError(f"temporal_consistency needs at least 2 frames, got {y.shape[0]}.")
    flat = y.reshape(y.shape[0], -1).to(torch.float64)
    mean = flat.mean(dim=1, keepdim=True)
    centred = flat - mean
    std = centred.pow(2).mean(dim=1).sqrt()
    a, b = centred[1:], centred[:-1]
    cos = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    flat_a, flat_b = std[1:] < _FLAT_STD, std[:-1] < _FLAT_STD
    both = flat_a & flat_b
    same_level = (mean[1:, 0] - mean[:-1, 0]).abs() < _FLAT_LEVEL
    cos = torch.where(flat_a ^ flat_b, torch.zeros_like(cos), cos)
    cos = torch.where(both, same_level.to(cos.dtype), cos)
    return float(cos.clamp(-1.0, 1.0).mean())


def motion_smoothness_interp(y: torch.Tensor) -> float:
    """1 - mean |y_t - (y_{t-1} + y_{t+1}) / 2| over t = 1..T-2, luma (T, H, W) in [0, 1]."""
    if y.shape[0] < 3:
        raise ValueError(f"motion_smoothness_interp needs at least 3 frames, got {y.shape[0]}.")
    y = y.to(torch.float64)
    error = (y[1:-1] - 0.5 * (y[:-2] + y[2:])).abs().mean()
    return float(1.0 - error)


def sharpness(y: torch.Tensor) -> float:
    """Mean over frames of the variance of the 4-neighbour Laplacian of luma (T, H, W) in [0, 1]."""
    if y.shape[-1] < 3 or y.shape[-2] < 3:
        raise ValueError(f"sharpness needs frames of at least 3x3 pixels, got {tuple(y.shape[-2:])}.")
    variances = []
    for start in range(0, y.shape[0], _CHUNK):
        c = y[start:start + _CHUNK].to(torch.float32)
        lap = c[:, :-2, 1:-1] + c[:, 2:, 1:-1] + c[:, 1:-1, :-2] + c[:, 1:-1, 2:] - 4.0 * c[:, 1:-1, 1:-1]
        variances.append(lap.flatten(1).var(dim=1, unbiased=False).to(torch.float64))
    return float(torch.cat(variances).mean())


def offline_metrics(frames: torch.Tensor, analysis_size: int = 128) -> Dict[str, float]:
    """All offline metrics of uint8 RGB frames (T, H, W, 3)."""
    if frames.shape[0] < 3:
        raise ValueError(f"the offline scorer needs at least 3 frames, got {frames.shape[0]}.")
    y = luma(frames)
    small = downsample(y, analysis_size)
    return {
        "temporal_consistency": temporal_consistency(small),
        "motion_smoothness_interp": motion_smoothness_interp(small),
        "sharpness": sharpness(y),
    }


def read_video(path: str, reader_type: str = "DecordVideo") -> torch.Tensor:
    """Every frame of the video at `path`, uint8 (T, H, W, 3); `VideoReadError` naming the file on failure."""
    from ..data import open_video

    with open_video(path, reader_type) as video:
        return video.get_frames(range(video.num_frames))


class OfflineScorer:
    """The weight-free scorer (see the module docstring)."""

    name = "offline"
    metrics = OFFLINE_METRICS

    def __init__(self, weights: Optional[Mapping[str, float]] = None, analysis_size: int = 128,
                 reader_type: str = "DecordVideo"):
        self.weights = check_weights(DEFAULT_OFFLINE_WEIGHTS if weights is None else weights, self.metrics)
        if analysis_size < 8:
            raise ScoringError(f"analysis_size must be at least 8, got {analysis_size}.")
        self.analysis_size = int(analysis_size)
        self.reader_type = reader_type

    def score_video(self, path: str) -> Dict[str, float]:
        frames = read_video(path, self.reader_type)
        try:
            return offline_metrics(frames, self.analysis_size)
        except ValueError as exc:
            from ..data import VideoReadError

            raise VideoReadError(f"{path}: {exc}") from None

    def score_videos(self, paths: Sequence[str], work_dir: Optional[str] = None,
                     progress: bool = False) -> Tuple[Dict[str, Dict[str, float]], Dict[str, str]]:
        """(metrics per path, reason per path that could not be scored)."""
        from ..data import VideoReadError

        scores, failed = {}, {}
        iterator = paths
        if progress:
            try:
                from tqdm import tqdm

                iterator = tqdm(paths, desc="scoring", unit="video")
            except ImportError:
                pass
        for path in iterator:
            try:
                scores[path] = self.score_video(path)
            except VideoReadError as exc:
                failed[path] = str(exc)
        return scores, failed


# ----------------------------------------------------------------------------------------------- VBench adapter

def vbench_cache_dir() -> str:
    """VBench's checkpoint cache, as VBench itself resolves it."""
    return os.environ.get("VBENCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vbench")


def vbench_checkpoints(cache_dir: Optional[str] = None) -> Dict[str, List[str]]:
    """The files (and one folder) VBench's local mode reads for each of the recipe's dimensions."""
    c = cache_dir or vbench_cache_dir()
    return {
        "subject_consistency": [os.path.join(c, "dino_model", "facebookresearch_dino_main"),
                                os.path.join(c, "dino_model", "dino_vitbase16_pretrain.pth")],
        "background_consistency": [os.path.join(c, "clip_model", "ViT-B-32.pt")],
        "motion_smoothness": [os.path.join(c, "amt_model", "amt-s.pth")],
        "aesthetic_quality": [os.path.join(c, "clip_model", "ViT-L-14.pt"),
                              os.path.join(c, "aesthetic_model", "emb_reader", "sa_0_4_vit_l_14_linear.pth")],
        "imaging_quality": [os.path.join(c, "pyiqa_model", "musiq_spaq_ckpt-358bb6af.pth")],
    }


def vbench_status(cache_dir: Optional[str] = None) -> Tuple[bool, str]:
    """(usable, reason): whether VBench is importable and its checkpoints for the recipe's dimensions are cached."""
    if importlib.util.find_spec("vbench") is None:
        return False, "the vbench package is not installed"
    missing = [p for paths in vbench_checkpoints(cache_dir).values() for p in paths if not os.path.exists(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return False, f"VBench checkpoints are missing ({shown})"
    return True, f"vbench is installed and its checkpoints are in {cache_dir or vbench_cache_dir()}"


VBENCH_HOWTO = ("install VBench (pip install vbench, see https://github.com/Vchitect/VBench) and put the checkpoints "
                "of subject_consistency, background_consistency, motion_smoothness, aesthetic_quality and "
                "imaging_quality in its cache (VBENCH_CACHE_DIR, default ~/.cache/vbench), e.g. by running VBench "
                "once on a machine with network access; or use --scorer offline")


def parse_vbench_results(results: Mapping, dimensions: Sequence[str],
                         path_of: Mapping[str, str]) -> Dict[str, Dict[str, float]]:
    """VBench's `<name>_eval_results.json` ({dim: [mean, [{"video_path", "video_results"}, ...]]}) -> metrics per video.

    `path_of` maps the file name VBench saw (basename) to our video path. Videos that lack a float result for some
    dimension are left out (the caller reports them as not scored).
    """
    per_video: Dict[str, Dict[str, float]] = {}
    for dim in dimensions:
        if dim not in results:
            raise ScoringError(f"VBench's results have no dimension {dim!r} (found {', '.join(results)}).")
        entry = results[dim]
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1], list):
            raise ScoringError(f"VBench's results for {dim!r} are not [mean, [per-video results]].")
        for item in entry[1]:
            if not isinstance(item, dict) or "video_path" not in item:
                continue
            value = item.get("video_results")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            path = path_of.get(os.path.basename(str(item["video_path"])))
            if path is not None:
                per_video.setdefault(path, {})[dim] = float(value)
    return {p: m for p, m in per_video.items() if all(d in m for d in dimensions)}


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cpu"


class VBenchScorer:
    """MindSpeed-MM's VBench scoring; built only when `vbench_status()` says VBench is usable."""

    name = "vbench"
    metrics = VBENCH_DIMENSIONS

    def __init__(self, weights: Optional[Mapping[str, float]] = None, device: Optional[str] = None,
                 cache_dir: Optional[str] = None, full_info_dir: str = "",
                 imaging_quality_preprocessing_mode: str = "longer"):
        usable, reason = vbench_status(cache_dir)
        if not usable:
            raise ScoringError(f"--scorer vbench: VBench is not usable here ({reason}). To use it, {VBENCH_HOWTO}.")
        self.weights = check_weights(DEFAULT_VBENCH_WEIGHTS if weights is None else weights, self.metrics)
        self.device = device or _default_device()
        self.full_info_dir = full_info_dir or ""  # VBench's full_info json; custom_input mode does not read it
        self.imaging_quality_preprocessing_mode = imaging_quality_preprocessing_mode

    def score_videos(self, paths: Sequence[str], work_dir: Optional[str] = None,
                     progress: bool = False) -> Tuple[Dict[str, Dict[str, float]], Dict[str, str]]:
        """Run VBench on `paths` (linked into `work_dir`/videos so that nothing else in the folder is scored)."""
        from vbench import VBench  # imported here: nothing else in the project needs vbench

        if work_dir is None:
            raise ScoringError("the VBench scorer needs a work folder for its inputs and results.")
        work = Path(work_dir)
        staged = work / "videos"
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        path_of = {}
        for path in paths:
            name = os.path.basename(path)
            try:
                os.symlink(os.path.abspath(path), staged / name)
            except OSError:
                shutil.copyfile(path, staged / name)
            path_of[name] = path
        bench = VBench(torch.device(self.device), self.full_info_dir, str(work))
        bench.evaluate(videos_path=str(staged), name=VBENCH_RUN_NAME, prompt_list=[],
                       dimension_list=list(self.metrics), local=True, read_frame=False, mode="custom_input",
                       imaging_quality_preprocessing_mode=self.imaging_quality_preprocessing_mode)
        result_file = work / f"{VBENCH_RUN_NAME}_eval_results.json"
        if not result_file.is_file():
            raise ScoringError(f"VBench wrote no results file {result_file}.")
        with open(result_file, encoding="utf-8") as handle:
            scores = parse_vbench_results(json.load(handle), self.metrics, path_of)
        failed = {p: "VBench returned no score for every dimension" for p in paths if p not in scores}
        return scores, failed


def build_scorer(kind: str = "auto", weights: Optional[Mapping[str, float]] = None,
                 reader_type: str = "DecordVideo", device: Optional[str] = None, **vbench_options):
    """(scorer, why): `auto` picks VBench when usable, else the offline scorer; `vbench` fails when it is not usable."""
    if kind not in SCORER_CHOICES:
        raise ScoringError(f"scorer {kind!r} is not one of {', '.join(SCORER_CHOICES)}.")
    if kind == "offline":
        return OfflineScorer(weights, reader_type=reader_type), "asked for with --scorer offline"
    usable, reason = vbench_status()
    if kind == "vbench" or usable:
        return (VBenchScorer(weights, device=device, **vbench_options),
                reason if kind == "auto" else "asked for with --scorer vbench")
    return OfflineScorer(weights, reader_type=reader_type), f"VBench is not usable: {reason}"
