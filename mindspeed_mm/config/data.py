"""Typed schema of the `--mm-data` JSON (raw-video, feature and DPO datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from .model import TokenizerConfig

# Caption dropout: the probability of training a sample on the empty prompt (MindSpeed-MM's `cfg` key), and the file
# feature extraction writes the empty prompt's states to, beside data.jsonl.
DEFAULT_CAPTION_DROPOUT = 0.1
EMPTY_PROMPT_FILE = "empty_prompt.pt"


@dataclass
class BasicParameters:
    data_path: str
    data_folder: str = ""
    data_storage_mode: Literal["standard", "combine"] = "standard"
    # Extension: rows whose `file`/`file_rejected` lie outside data_folder (absolute, or `..`) are skipped unless true.
    allow_paths_outside_data_folder: bool = False


@dataclass
class PreprocessParameters:
    video_processor_type: Literal["CogVideoXProcessor"] = "CogVideoXProcessor"
    # "PyAVVideo" is an extension: the reader used where decord has no wheel (aarch64).
    video_reader_type: Literal["DecordVideo", "PyAVVideo"] = "DecordVideo"
    train_fps: int = 8
    skip_frame_num: int = 0
    num_frames: int = 136
    max_height: int = 544
    max_width: int = 992
    train_pipeline: Dict[str, Any] = field(default_factory=lambda: {"video": [], "image": []})
    # Caption dropout (MindSpeed-MM's name): the probability that a training sample's text is replaced by the empty
    # prompt's, which trains the unconditional branch classifier-free guidance samples with.
    cfg: float = DEFAULT_CAPTION_DROPOUT

    def validate(self) -> None:
        # Plain ValueError on purpose: from_dict turns it into a ConfigError that names the file and key.
        if not 0.0 <= self.cfg < 1.0:
            raise ValueError(f"cfg {self.cfg} (caption dropout) must be in [0, 1); 0.1 is usual, 0 turns it off.")
        for name in ("train_fps", "num_frames", "max_height", "max_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.skip_frame_num < 0:
            raise ValueError(f"skip_frame_num must be non-negative, got {self.skip_frame_num}.")


@dataclass
class DatasetParam:
    dataset_type: Literal["t2v", "i2v", "feature"]
    basic_parameters: BasicParameters
    preprocess_parameters: Optional[PreprocessParameters] = None
    skip_define_frame_index: bool = False
    use_text_processer: bool = True
    enable_text_preprocessing: bool = False
    tokenizer_config: Optional[List[TokenizerConfig]] = None


def caption_dropout(param: "DatasetParam") -> float:
    """The caption dropout of a dataset: preprocess_parameters.cfg, or the default without that section."""
    pre = param.preprocess_parameters
    return pre.cfg if pre is not None else DEFAULT_CAPTION_DROPOUT


@dataclass
class DataloaderParam:
    dataloader_mode: Literal["sampler"] = "sampler"
    sampler_type: Literal["SequentialSampler", "RandomSampler"] = "SequentialSampler"
    shuffle: bool = False
    drop_last: bool = True
    pin_memory: bool = True
    group_frame: bool = False
    group_resolution: bool = False
    collate_param: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MMDataConfig:
    """The whole `--mm-data` file."""

    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = field(default_factory=DataloaderParam)
