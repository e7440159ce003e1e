"""Typed schema of the `--mm-tool` JSON (profiling and feature-extraction output)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional


@dataclass
class StaticProfileParam:
    level: str = "level1"
    with_stack: bool = False
    with_memory: bool = False
    record_shapes: bool = False
    with_cpu: bool = True
    save_path: str = "./npu_profiling"
    start_step: int = 10
    end_step: int = 11
    data_simplification: bool = False
    aic_metrics_type: str = "PipeUtilization"


@dataclass
class DynamicProfileParam:
    config_path: str = ""


@dataclass
class ProfileConfig:
    enable: bool = False
    profile_type: Literal["static", "dynamic"] = "static"
    ranks: List[int] = field(default_factory=lambda: [0])
    static_param: StaticProfileParam = field(default_factory=StaticProfileParam)
    dynamic_param: DynamicProfileParam = field(default_factory=DynamicProfileParam)


@dataclass
class MemoryProfileConfig:
    enable: bool = False
    start_step: int = 0
    end_step: int = 2
    save_path: str = "./memory_snapshot"
    dump_ranks: List[int] = field(default_factory=lambda: [0])
    stacks: str = "all"
    max_entries: Optional[int] = None
    mem_info: bool = False


@dataclass
class SoraFeatureConfig:
    # Feature extraction always writes both and in one layout: these keys may only say so.
    extract_video_feature: bool = True
    extract_text_feature: bool = True
    save_path: str = "./sora_features"
    data_storage_mode: Literal["sorafeatured"] = "sorafeatured"
    # extension: encode every caption of a row (text tensors (N, L, C)); training then draws one per epoch.
    all_captions: bool = False

    def validate(self) -> None:
        for key in ("extract_video_feature", "extract_text_feature"):
            if not getattr(self, key):
                raise ValueError(f"{key} false: feature extraction always writes the VAE latents and the text states "
                                 f"into one .pt per video (the files pretraining and DPO read); set it true.")


@dataclass
class MMToolConfig:
    """The whole `--mm-tool` file."""

    profile: ProfileConfig = field(default_factory=ProfileConfig)
    memory_profile: MemoryProfileConfig = field(default_factory=MemoryProfileConfig)
    sorafeature: SoraFeatureConfig = field(default_factory=SoraFeatureConfig)
