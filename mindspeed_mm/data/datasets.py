"""Datasets of the `--mm-data` JSON: raw videos with captions ("t2v", "i2v") and extracted features ("feature").

Both also read DPO rows (`file_rejected`, `score`, `score_rejected`). A sample that cannot be read (a video that fails
to decode, a `.pt` file without the required keys) is logged with its file name, counted in `read_failures`, and
replaced by the next readable row (index + 1, + 2, ..., wrapping around), so a bad row is never fatal and the
replacement is deterministic. Only when no row at all can be read is it an error. The counts are per process: each
DataLoader worker holds its own.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..config.data import DatasetParam, MMDataConfig, PreprocessParameters
from .frame_sampling import pad_last_frame, select_frame_indices
from .manifest import Manifest, ManifestError, ManifestRow, choose_caption, read_manifest
from .transforms import preprocess_frames
from .video_io import VideoReadError, open_video

logger = logging.getLogger(__name__)

Tokenizer = Callable[[Sequence[str]], Any]
FEATURE_KEYS = ("video", "prompt_ids", "prompt_mask")


class BadSampleError(RuntimeError):
    """A row whose data cannot be read; the dataset skips it and uses the next readable row.

    `reason` is the short category it is counted under in `read_failures`.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class _SubstitutingDataset(Dataset):
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.rows: List[ManifestRow] = manifest.rows
        self.read_failures: Counter = Counter()  # reason -> count, this process only
        self._bad: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, index: int) -> Dict[str, Any]:
        raise NotImplementedError

    def load(self, index: int) -> Dict[str, Any]:
        """Exactly row `index`, without substitution; raises BadSampleError when it cannot be read."""
        return self._load(index)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self.rows)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} rows.")
        index %= n
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return self._load(i)
            except BadSampleError as exc:
                self._bad[i] = str(exc)
                self.read_failures[exc.reason] += 1
                logger.warning("skipping row %d (line %d of %s): %s; using the next readable row instead.",
                               i, self.rows[i].line, self.manifest.source, exc)
        raise RuntimeError(f"{self.manifest.source}: none of the {n} rows can be read "
                           f"({sum(self.read_failures.values())} failed here); see the warnings above for each file.")


class VideoTextDataset(_SubstitutingDataset):
    """Raw videos and captions (dataset_type "t2v" / "i2v").

    A sample is {"video": float32 (T, 3, H, W) in [-1, 1], "caption": str, "file": str}; with `tokenizers` (callables
    mapping a list of strings to int64 (ids, mask), each (b, L)) also "prompt_ids": [ids (L1,), ids (L2,), ...] and
    "prompt_mask" likewise; for DPO rows also "video_rejected" (same layout as "video"), "score" and "score_rejected"
    (float32 scalars). T = num_frames, H x W = max_height x max_width.
    """

    def __init__(self, manifest: Manifest, preprocess: PreprocessParameters,
                 tokenizers: Optional[List[Tokenizer]] = None, dataset_type: str = "t2v", seed: int = 0):
        super().__init__(manifest)
        preprocess.validate()
        self.preprocess = preprocess
        self.tokenizers = list(tokenizers) if tokenizers else []
        self.dataset_type = dataset_type
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Caption lists give a different choice per epoch (the choice depends on seed, epoch and index only)."""
        self.epoch = epoch

    def read_clip(self, path: str) -> torch.Tensor:
        """The (T, 3, H, W) clip of one video file; BadSampleError when it cannot be decoded or is too short."""
        p = self.preprocess
        try:
            with open_video(path, p.video_reader_type) as video:
                indices = select_frame_indices(video.num_frames, video.fps, p.train_fps, p.num_frames,
                                               p.skip_frame_num)[:p.num_frames]
                frames = video.get_frames(indices)
        except VideoReadError as exc:
            raise BadSampleError(str(exc), "unreadable video") from exc
        except ValueError as exc:  # too short for skip_frame_num
            raise BadSampleError(f"{path}: {exc}", "video too short") from exc
        return preprocess_frames(pad_last_frame(frames, p.num_frames), p.max_height, p.max_width)

    def tokenize(self, caption: str) -> Dict[str, List[torch.Tensor]]:
        ids_list, mask_list = [], []
        for tok in self.tokenizers:
            ids, mask = tok([caption])
            if ids.ndim != 2 or ids.shape[0] != 1 or mask.shape != ids.shape:
                raise ValueError(f"tokenizer {type(tok).__name__} returned ids {tuple(ids.shape)} and mask "
                                 f"{tuple(mask.shape)} for one prompt; expected (1, L) each.")
            ids_list.append(ids[0])
            mask_list.append(mask[0])
        return {"prompt_ids": ids_list, "prompt_mask": mask_list}

    def _load(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        sample: Dict[str, Any] = {"video": self.read_clip(row.path)}
        if row.is_dpo:
            sample["video_rejected"] = self.read_clip(row.path_rejected)
            sample["score"] = torch.tensor(row.score, dtype=torch.float32)
            sample["score_rejected"] = torch.tensor(row.score_rejected, dtype=torch.float32)
        sample["caption"] = choose_caption(row.captions, self.seed, index, self.epoch)
        sample["file"] = row.file
        if self.tokenizers:
            sample.update(self.tokenize(sample["caption"]))
        return sample


def _squeeze_one(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t[0] if t.ndim == ndim + 1 and t.shape[0] == 1 else t


class FeatureDataset(_SubstitutingDataset):
    """Features written by feature extraction (dataset_type "feature"): one `torch.save` dict per `.pt` row.

    The file holds "video" (latents (t, c, h, w)), "prompt_ids" ([llm states (1, L1, C1), clip states (1, L2, C2)]),
    "prompt_mask" ([(1, L1), (1, L2)]) and optionally "image_latents" (t, c, h, w) or other keys. A sample is:
    {"video": (t, c, h, w), "prompt_ids": [(L1, C1), (L2, C2)], "prompt_mask": [(L1,), (L2,)], "file": str, every
    other key of the file as stored}; the leading 1 of the text tensors is removed (files without it are accepted), so
    the collated batch is "prompt_ids" [(b, L1, C1), (b, L2, C2)] and "prompt_mask" [(b, L1), (b, L2)]. Dtypes are kept
    as stored (bf16 latents). DPO rows add "video_rejected" (the "video" of `file_rejected`), "score", "score_rejected".
    """

    def _read(self, path: str) -> Dict[str, Any]:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, OSError
            raise BadSampleError(f"{path}: torch.load failed ({type(exc).__name__}: {str(exc)[:200]})",
                                 "unreadable .pt") from exc
        if not isinstance(data, dict):
            raise BadSampleError(f"{path}: holds a {type(data).__name__}, not a feature dict", "not a feature dict")
        missing = [k for k in FEATURE_KEYS if k not in data]
        if missing:
            raise BadSampleError(f"{path}: the feature file lacks the keys {missing}", "missing keys")
        if not isinstance(data["video"], torch.Tensor) or data["video"].ndim != 4:
            raise BadSampleError(f"{path}: 'video' must be latents (t, c, h, w)", "bad 'video'")
        ids, mask = data["prompt_ids"], data["prompt_mask"]
        if (not isinstance(ids, (list, tuple)) or not isinstance(mask, (list, tuple)) or len(ids) != len(mask)
                or not all(isinstance(t, torch.Tensor) for t in list(ids) + list(mask))):
            raise BadSampleError(f"{path}: 'prompt_ids' and 'prompt_mask' must be equal-length lists of tensors",
                                 "bad prompt")
        data["prompt_ids"] = [_squeeze_one(t, 2) for t in ids]
        data["prompt_mask"] = [_squeeze_one(t, 1) for t in mask]
        for i, (s, m) in enumerate(zip(data["prompt_ids"], data["prompt_mask"])):
            if s.ndim != 2 or m.ndim != 1 or s.shape[0] != m.shape[0]:
                raise BadSampleError(f"{path}: prompt_ids[{i}] {tuple(s.shape)} and prompt_mask[{i}] {tuple(m.shape)} "
                                     f"are not (1, L, C) and (1, L)", "bad prompt")
        return data

    def _load(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        sample = self._read(row.path)
        if row.is_dpo:
            rejected = self._read(row.path_rejected)["video"]
            if rejected.shape != sample["video"].shape:
                raise BadSampleError(f"{row.path_rejected}: rejected latents {tuple(rejected.shape)} differ from "
                                     f"{tuple(sample['video'].shape)} in {row.path}", "bad DPO pair")
            sample["video_rejected"] = rejected
            sample["score"] = torch.tensor(row.score, dtype=torch.float32)
            sample["score_rejected"] = torch.tensor(row.score_rejected, dtype=torch.float32)
        sample["file"] = row.file
        return sample


def build_tokenizers(dataset_param: DatasetParam) -> Optional[List[Tokenizer]]:
    """The tokenizers named by `tokenizer_config` (None when it is absent or `use_text_processer` is false)."""
    if not dataset_param.use_text_processer or not dataset_param.tokenizer_config:
        return None
    from ..models.text_encoder.tokenizers import build_tokenizer

    return [build_tokenizer(cfg) for cfg in dataset_param.tokenizer_config]


def build_dataset(data_config, tokenizers: Optional[List[Tokenizer]] = None, seed: int = 0,
                  check_files: bool = True) -> Dataset:
    """The dataset of an `MMDataConfig` (or its `DatasetParam`), dispatching on `dataset_type`.

    Raw-video datasets tokenize only when `tokenizers` is given (see `build_tokenizers`); the feature dataset never
    does.
    """
    param = data_config.dataset_param if isinstance(data_config, MMDataConfig) else data_config
    basic = param.basic_parameters
    if basic.data_storage_mode != "standard":
        raise ValueError(f"dataset_param.basic_parameters.data_storage_mode {basic.data_storage_mode!r} is not "
                         f"supported; StepVideo uses 'standard' (data_path is one data.jsonl).")
    if param.enable_text_preprocessing and param.dataset_type != "feature":
        raise ValueError("dataset_param.enable_text_preprocessing true (caption cleaning) is not implemented; the "
                         "released StepVideo recipe sets it false, and captions are used as written. Set it false.")
    if param.dataset_type == "feature":
        try:
            manifest = read_manifest(basic.data_path, basic.data_folder, require_captions=False,
                                     check_files=check_files, suffixes=(".pt",))
        except ManifestError as exc:
            if "not a .pt file" in str(exc):
                raise ManifestError(f"{exc} dataset_type 'feature' reads the .pt files written by feature extraction; "
                                    f"for raw videos set dataset_type to 't2v' or 'i2v'.") from exc
            raise
        return FeatureDataset(manifest)
    if param.dataset_type in ("t2v", "i2v"):
        if param.preprocess_parameters is None:
            raise ValueError(f"dataset_type {param.dataset_type!r} needs dataset_param.preprocess_parameters "
                             f"(num_frames, train_fps, max_height, ...).")
        manifest = read_manifest(basic.data_path, basic.data_folder, require_captions=True, check_files=check_files)
        return VideoTextDataset(manifest, param.preprocess_parameters, tokenizers, param.dataset_type, seed)
    raise ValueError(f"dataset_param.dataset_type {param.dataset_type!r} is not 't2v', 'i2v' or 'feature'.")


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch samples: tensors are stacked, lists of tensors become lists of stacked tensors, numbers become tensors,
    strings (and anything else) become lists."""
    if not samples:
        raise ValueError("cannot collate an empty batch.")
    keys = list(samples[0])
    for s in samples[1:]:
        if list(s) != keys:
            raise ValueError(f"samples have different keys: {keys} vs {list(s)}.")
    return {key: _collate_values([s[key] for s in samples], key) for key in keys}


def _stack(values: List[torch.Tensor], key: str) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch '{key}': its samples have different shapes {sorted(shapes)}.")
    return torch.stack(values)


def _collate_values(values: List[Any], key: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return _stack(values, key)
    if isinstance(first, (list, tuple)) and first and all(isinstance(t, torch.Tensor) for t in first):
        if any(len(v) != len(first) for v in values):
            raise ValueError(f"cannot batch '{key}': its samples have lists of different lengths.")
        return [_stack([v[i] for v in values], f"{key}[{i}]") for i in range(len(first))]
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return list(values)
    return torch.tensor(values)
