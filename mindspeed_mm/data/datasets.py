"""Datasets of the `--mm-data` JSON: raw videos with captions ("t2v", "i2v") and extracted features ("feature").

Both also read DPO rows (`file_rejected`, `score`, `score_rejected`). A sample that cannot be read (a video that fails
to decode, a `.pt` file without the required keys) is logged once per process with its file name and replaced by the
next readable row (index + 1, + 2, ..., wrapping around), so a bad row is never fatal and the replacement is
deterministic. Every sample carries `skipped_rows`, the `[line, reason]` pairs of the rows skipped to produce it, so
the trainer can gather them from all ranks and DataLoader workers and report them (`summarize_skipped`). Only when no
row at all can be read is it an error.

A dataset is indexed by a row index (epoch 0) or by an `(index, epoch)` pair, which is what the sampler of
`build_dataloader` yields: the epoch travels with the index into DataLoader workers, and caption lists are re-drawn per
epoch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from ..config.base import ConfigError
from ..config.data import DatasetParam, MMDataConfig, PreprocessParameters
from ..errors import MindSpeedMMError
from .frame_sampling import pad_last_frame, select_frame_indices
from .manifest import Manifest, ManifestError, ManifestRow, choose_caption, format_lines, read_manifest
from .transforms import preprocess_frames
from ..io.video import VideoReadError, open_video

logger = logging.getLogger(__name__)

Tokenizer = Callable[[Sequence[str]], Any]
FEATURE_KEYS = ("video", "prompt_ids", "prompt_mask")
# What feature extraction made a .pt from (source path, caption, frame settings); metadata, not a sample key.
RECORD_KEY = "extracted_from"
SKIPPED_KEY = "skipped_rows"
Key = Union[int, Tuple[int, int]]


class BadSampleError(RuntimeError):
    """A row whose data cannot be read; the dataset skips it and uses the next readable row.

    `reason` is the short category it is counted under in `read_failures` and `skipped_rows`.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class BatchError(MindSpeedMMError, ValueError):
    """Samples that cannot be batched together (e.g. features extracted at different sizes)."""


def _split_key(key: Key) -> Tuple[int, int]:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return int(key[0]), int(key[1])
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"a dataset index is a row index or an (index, epoch) pair, got {key!r}.")
    return key, 0


class _SubstitutingDataset(Dataset):
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.rows: List[ManifestRow] = manifest.rows
        self.read_failures: Counter = Counter()  # reason -> count of distinct rows, this process only
        self._bad: Dict[int, str] = {}  # row index -> reason; a row that failed once is not retried here

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, index: int, epoch: int) -> Dict[str, Any]:
        raise NotImplementedError

    def load(self, index: int, epoch: int = 0) -> Dict[str, Any]:
        """Exactly row `index`, without substitution; raises BadSampleError when it cannot be read."""
        return self._load(index, epoch)

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        index, epoch = _split_key(key)
        n = len(self.rows)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} rows.")
        index %= n
        skipped: List[list] = []
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:  # reported again: the trainer counts rows, not how often they were met
                skipped.append([self.rows[i].line, self._bad[i]])
                continue
            try:
                sample = self._load(i, epoch)
            except BadSampleError as exc:
                self._bad[i] = exc.reason
                self.read_failures[exc.reason] += 1
                skipped.append([self.rows[i].line, exc.reason])
                logger.warning("skipping row %d (line %d of %s): %s; using the next readable row instead.",
                               i, self.rows[i].line, self.rows[i].source or self.manifest.source, exc)
                continue
            sample[SKIPPED_KEY] = skipped
            return sample
        raise ManifestError(f"{self.manifest.source}: none of the {n} rows can be read ({_by_reason(skipped)[1]}); "
                            f"see the warnings above for each file.")


def summarize_skipped(pairs: Iterable[Sequence[Any]]) -> str:
    """One line about the rows skipped at read time, from `[line, reason]` pairs gathered from samples (any number of
    ranks, workers, micro-batches and repeats): each distinct line counts once, under the first reason seen for it.

    `summarize_skipped([[7, "unreadable video"], [9, "unreadable .pt"], [7, "unreadable video"]])` is
    "2 rows skipped and replaced by the next readable row: 1 unreadable video (line 7), 1 unreadable .pt (line 9)";
    no pairs give "".
    """
    n, parts = _by_reason(pairs)
    return f"{n} row{'s' if n > 1 else ''} skipped and replaced by the next readable row: {parts}" if n else ""


def _by_reason(pairs: Iterable[Sequence[Any]]) -> Tuple[int, str]:
    """(distinct lines, "1 unreadable video (line 7), 2 unreadable .pt (lines 9, 12)")."""
    reason_of: Dict[int, str] = {}
    for line, reason in pairs:
        reason_of.setdefault(int(line), str(reason))
    by_reason: Dict[str, List[int]] = {}
    for line in sorted(reason_of):
        by_reason.setdefault(reason_of[line], []).append(line)
    return len(reason_of), ", ".join(f"{len(lines)} {reason} ({format_lines(lines)})"
                                     for reason, lines in by_reason.items())


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

    def _load(self, index: int, epoch: int) -> Dict[str, Any]:
        row = self.rows[index]
        sample: Dict[str, Any] = {"video": self.read_clip(row.path)}
        if row.is_dpo:
            sample["video_rejected"] = self.read_clip(row.path_rejected)
            sample["score"] = torch.tensor(row.score, dtype=torch.float32)
            sample["score_rejected"] = torch.tensor(row.score_rejected, dtype=torch.float32)
        sample["caption"] = choose_caption(row.captions, self.seed, index, epoch)
        sample["file"] = row.file
        if self.tokenizers:
            sample.update(self.tokenize(sample["caption"]))
        return sample


def _squeeze_one(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t[0] if t.ndim == ndim + 1 and t.shape[0] == 1 else t


class FeatureDataset(_SubstitutingDataset):
    """Features written by feature extraction (dataset_type "feature"): one `torch.save` dict per `.pt` row.

    The file holds "video" (latents (t, c, h, w)), "prompt_ids" ([llm states (1, L1, C1), clip states (1, L2, C2)];
    the name is MindSpeed-MM's feature format, kept on disk), "prompt_mask" ([(1, L1), (1, L2)]) and optionally
    "image_latents" (t, c, h, w) or other keys. A sample is: {"video": (t, c, h, w), "prompt": [(L1, C1), (L2, C2)]
    (the encoders' states: batches say what they hold, "prompt_ids" is for token ids), "prompt_mask": [(L1,), (L2,)],
    "file": str, every other key of the file as stored}; the leading 1 of the text tensors is removed (files without it
    are accepted), so the collated batch is "prompt" [(b, L1, C1), (b, L2, C2)] and "prompt_mask" [(b, L1), (b, L2)].
    Dtypes are kept
    as stored (bf16 latents). DPO rows add "video_rejected" (the "video" of `file_rejected`), "score", "score_rejected",
    and, when the winner has "image_latents" (i2v), "image_latents_rejected": the loser's own image condition. The
    record of what a file was made from (`extracted_from`) is not returned.

    A file extracted with `sorafeature.all_captions` holds every caption of its row: text tensors (N, L, C) and masks
    (N, L). A sample then takes caption k of N, chosen from (seed, row, epoch) as raw datasets choose a caption, so
    the wording of a video changes from epoch to epoch (the sampler passes the epoch with the index).
    """

    def __init__(self, manifest: Manifest, seed: int = 0):
        super().__init__(manifest)
        self.seed = seed

    def _read(self, path: str, index: int = 0, epoch: int = 0) -> Dict[str, Any]:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, OSError
            raise BadSampleError(f"{path}: torch.load failed ({type(exc).__name__}: {str(exc)[:200]})",
                                 "unreadable .pt") from exc
        if not isinstance(data, dict):
            raise BadSampleError(f"{path}: holds a {type(data).__name__}, not a feature dict", "not a feature dict")
        data.pop(RECORD_KEY, None)  # metadata; samples keep the same keys whether or not a file has it
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
        ids = data.pop("prompt_ids")
        count = ids[0].shape[0] if ids[0].ndim == 3 else 1
        if count > 1:  # every caption of the row was extracted: this epoch's
            if any(t.ndim != 3 or t.shape[0] != count for t in ids) or any(m.shape[0] != count for m in mask):
                raise BadSampleError(f"{path}: prompt_ids / prompt_mask hold different numbers of captions",
                                     "bad prompt")
            k = random.Random(f"{self.seed}/{epoch}/{index}").randrange(count)
            ids, mask = [t[k:k + 1] for t in ids], [m[k:k + 1] for m in mask]
        data["prompt"] = [_squeeze_one(t, 2) for t in ids]
        data["prompt_mask"] = [_squeeze_one(t, 1) for t in mask]
        for i, (s, m) in enumerate(zip(data["prompt"], data["prompt_mask"])):
            if s.ndim != 2 or m.ndim != 1 or s.shape[0] != m.shape[0]:
                raise BadSampleError(f"{path}: prompt_ids[{i}] {tuple(s.shape)} and prompt_mask[{i}] {tuple(m.shape)} "
                                     f"are not (1, L, C) and (1, L)", "bad prompt")
        return data

    def _load(self, index: int, epoch: int) -> Dict[str, Any]:
        row = self.rows[index]
        sample = self._read(row.path, index, epoch)
        if row.is_dpo:
            loser = self._read(row.path_rejected)
            rejected = loser["video"]
            if rejected.shape != sample["video"].shape:
                raise BadSampleError(f"{row.path_rejected}: rejected latents {tuple(rejected.shape)} differ from "
                                     f"{tuple(sample['video'].shape)} in {row.path}", "bad DPO pair")
            sample["video_rejected"] = rejected
            if "image_latents" in sample:  # i2v: the loser is conditioned on its own first frame, never the winner's
                cond = loser.get("image_latents")
                if not isinstance(cond, torch.Tensor) or cond.shape != sample["image_latents"].shape:
                    found = "none" if cond is None else tuple(getattr(cond, "shape", ()))
                    raise BadSampleError(
                        f"{row.path_rejected}: the winner {row.path} has i2v image_latents "
                        f"{tuple(sample['image_latents'].shape)} but the loser has {found}; extract both videos of "
                        f"each pair with the i2v launcher (feature_extraction_i2v.sh)", "bad DPO pair")
                sample["image_latents_rejected"] = cond
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
                  check_files: bool = True, log: Optional[bool] = None) -> Dataset:
    """The dataset of an `MMDataConfig` (or its `DatasetParam`), dispatching on `dataset_type`.

    Raw-video datasets tokenize only when `tokenizers` is given (see `build_tokenizers`); the feature dataset never
    does. `log` is `read_manifest`'s: by default the manifest summary is logged on global rank 0 only.
    """
    param = data_config.dataset_param if isinstance(data_config, MMDataConfig) else data_config
    basic = param.basic_parameters
    if basic.data_storage_mode != "standard":
        raise ConfigError(f"dataset_param.basic_parameters.data_storage_mode {basic.data_storage_mode!r} is not "
                          f"supported; StepVideo uses 'standard' (data_path is one data.jsonl).")
    if param.enable_text_preprocessing and param.dataset_type != "feature":
        raise ConfigError("dataset_param.enable_text_preprocessing true (caption cleaning) is not implemented; the "
                          "released StepVideo recipe sets it false, and captions are used as written. Set it false.")
    read = dict(check_files=check_files, log=log, allow_outside=basic.allow_paths_outside_data_folder)
    if param.dataset_type == "feature":
        try:
            manifest = read_manifest(basic.data_path, basic.data_folder, require_captions=False, suffixes=(".pt",),
                                     **read)
        except ManifestError as exc:
            if "not a .pt file" in str(exc):
                raise ManifestError(f"{exc} dataset_type 'feature' reads the .pt files written by feature extraction; "
                                    f"for raw videos set dataset_type to 't2v' or 'i2v'.") from exc
            raise
        return FeatureDataset(manifest, seed=seed)
    if param.dataset_type in ("t2v", "i2v"):
        if param.preprocess_parameters is None:
            raise ConfigError(f"dataset_type {param.dataset_type!r} needs dataset_param.preprocess_parameters "
                              f"(num_frames, train_fps, max_height, ...).")
        manifest = read_manifest(basic.data_path, basic.data_folder, require_captions=True, **read)
        return VideoTextDataset(manifest, param.preprocess_parameters, tokenizers, param.dataset_type, seed)
    raise ConfigError(f"dataset_param.dataset_type {param.dataset_type!r} is not 't2v', 'i2v' or 'feature'.")


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch samples: tensors are stacked, lists of tensors become lists of stacked tensors, numbers become tensors,
    strings (and anything else) become lists; `skipped_rows` becomes one list of `[line, reason]` pairs per sample."""
    if not samples:
        raise ValueError("cannot collate an empty batch.")
    keys = list(samples[0])
    for s in samples[1:]:
        if list(s) != keys:
            raise BatchError(f"samples have different keys: {keys} vs {list(s)} (files {_files(samples)}); the "
                             f"rows of one dataset must have the same keys (e.g. all i2v or all t2v features).")
    return {key: _collate_values([s[key] for s in samples], key, samples) for key in keys}


def _files(samples: List[Dict[str, Any]]) -> List[Any]:
    return [s.get("file") for s in samples]


def _stack(values: List[torch.Tensor], key: str, samples: List[Dict[str, Any]]) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise BatchError(f"cannot batch '{key}': its samples have different shapes {sorted(shapes)} (files "
                         f"{_files(samples)}). Extract or sample all videos at the same num_frames, max_height and "
                         f"max_width, or use --micro-batch-size 1.")
    return torch.stack(values)


def _collate_values(values: List[Any], key: str, samples: List[Dict[str, Any]]) -> Any:
    first = values[0]
    if key == SKIPPED_KEY:
        return [list(v) for v in values]
    if isinstance(first, torch.Tensor):
        return _stack(values, key, samples)
    if isinstance(first, (list, tuple)) and first and all(isinstance(t, torch.Tensor) for t in first):
        if any(len(v) != len(first) for v in values):
            raise BatchError(f"cannot batch '{key}': its samples have lists of different lengths (files "
                             f"{_files(samples)}).")
        return [_stack([v[i] for v in values], f"{key}[{i}]", samples) for i in range(len(first))]
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return list(values)
    return torch.tensor(values)
