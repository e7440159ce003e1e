"""Typed schema of the `--mm-model` JSON (pretrain, inference, DPO and feature extraction).

Key names are the seed's (MindSpeed-MM's StepVideo example configs). Keys we added are
marked "extension"; nothing of the seed's is renamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import torch

DtypeName = Literal["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"]

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name ("bf16", "float32", ...)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}") from None


@dataclass
class PredictorConfig:
    """The StepVideo DiT (`predictor` section). Defaults are the released 30B model."""

    model_id: Literal["stepvideodit"] = "stepvideodit"
    from_pretrained: Optional[str] = None
    dtype: DtypeName = "bf16"
    num_layers: int = 48
    num_heads: int = 48
    head_dim: int = 128
    channel_split: List[int] = field(default_factory=lambda: [64, 32, 32])
    in_channels: int = 64
    out_channels: int = 64
    dropout: float = 0.0
    patch_size: int = 1
    patch_size_thw: List[int] = field(default_factory=lambda: [1, 1, 1])
    norm_type: Literal["ada_norm_single"] = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    attention_norm_type: Literal["rmsnorm"] = "rmsnorm"
    attention_norm_elementwise_affine: bool = True
    attention_norm_eps: float = 1e-6
    fa_layout: Literal["bsnd"] = "bsnd"
    use_additional_conditions: bool = False
    caption_channels: List[int] = field(default_factory=lambda: [6144, 1024])
    # Accepted for compatibility with the seed's i2v inference JSON; it has no effect.
    masked_softmax_fusion: bool = False
    # extension: "auto" picks npu fusion attention / flash-attn / SDPA by device.
    attention_backend: Literal["auto", "sdpa", "flash", "npu"] = "auto"

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def validate(self) -> None:
        if sum(self.channel_split) != self.head_dim:
            raise ValueError(
                f"channel_split {self.channel_split} must sum to head_dim {self.head_dim} "
                f"(frame, row and column RoPE widths)."
            )
        if len(self.channel_split) != 3 or any(c % 2 for c in self.channel_split):
            raise ValueError(f"channel_split {self.channel_split} must be three even widths (frame, row, column).")
        if self.patch_size < 1:
            raise ValueError(f"patch_size {self.patch_size} must be at least 1.")
        if list(self.patch_size_thw) != [1, self.patch_size, self.patch_size]:
            raise ValueError(
                f"patch_size_thw {self.patch_size_thw} must be [1, patch_size, patch_size] = "
                f"[1, {self.patch_size}, {self.patch_size}]: StepVideo patchifies each latent frame on its own."
            )
        if len(self.caption_channels) != 2:
            raise ValueError(f"caption_channels {self.caption_channels} must be [step_llm width, clip width].")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1).")


@dataclass
class I2VProcessorConfig:
    processor_id: Literal["stepvideo_i2v_processor"] = "stepvideo_i2v_processor"


@dataclass
class AEConfig:
    """The StepVideo Video-VAE (`ae` section)."""

    model_id: Literal["stepvideovae"] = "stepvideovae"
    from_pretrained: Optional[str] = None
    dtype: DtypeName = "bf16"
    z_channels: int = 64
    frame_len: int = 17
    version: Literal[1, 2] = 2
    i2v_processor: Optional[I2VProcessorConfig] = None
    # extensions: widths (official defaults) so tests can build tiny VAEs, and tiling.
    encoder_ch: int = 32
    encoder_ch_mult: List[int] = field(default_factory=lambda: [4, 8, 16, 16])
    decoder_ch: int = 128
    decoder_ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    use_tiling: bool = False
    tile_sample_size: int = 256
    tile_overlap: int = 64


@dataclass
class TextEncoderConfig:
    """One entry of the `text_encoder` list."""

    model_id: Literal["StepLLmModel", "BertModel"]
    from_pretrained: str
    hub_backend: Literal["hf"] = "hf"
    dtype: DtypeName = "bf16"


@dataclass
class TokenizerConfig:
    """One entry of `tokenizer` (model JSON) or `tokenizer_config` (data JSON)."""

    autotokenizer_name: Literal["stepchat", "BertTokenizer"]
    from_pretrained: str
    hub_backend: Literal["hf"] = "hf"
    model_max_length: int = 320

    def validate(self) -> None:
        if self.model_max_length < 2:
            raise ValueError(f"model_max_length {self.model_max_length} must leave room for the begin and end "
                             f"tokens (>= 2; 320 for stepchat, 77 for BertTokenizer).")


@dataclass
class DiffusionConfig:
    """Flow matching (`diffusion` section)."""

    model_id: Literal["flow_match_discrete_scheduler"] = "flow_match_discrete_scheduler"
    num_train_timesteps: int = 1000
    num_inference_timesteps: Optional[int] = None
    shift: float = 13.0
    reverse: bool = False
    solver: Literal["euler"] = "euler"
    # extension: shift the training noise levels like the sampling schedule. 13.0, the released sampler's shift,
    # by measurement (docs/pretraining.md, benchmarks/guidance_and_shift.py); null: the unshifted logit-normal t.
    train_shift: Optional[float] = 13.0

    def validate(self) -> None:
        if self.reverse:
            raise ValueError("reverse = true runs the schedule from data to noise, which is not the convention of "
                             "the released StepVideo weights (t = 0 is noise); set \"reverse\": false.")
        if self.shift <= 0:
            raise ValueError(f"shift {self.shift} must be positive (13.0 in the released pipeline).")
        if self.train_shift is not None and self.train_shift <= 0:
            raise ValueError(f"train_shift {self.train_shift} must be positive, or null for no shift.")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps {self.num_train_timesteps} must be at least 1.")
        if self.num_inference_timesteps is not None and self.num_inference_timesteps < 1:
            raise ValueError(f"num_inference_timesteps {self.num_inference_timesteps} must be at least 1.")


@dataclass
class PipelineConfig:
    """Inference pipeline settings (`pipeline_config` section)."""

    version: str = "stepvideo"
    use_attention_mask: bool = True
    input_size: List[int] = field(default_factory=lambda: [204, 544, 992])
    guidance_scale: float = 9.0
    model_type: Literal["t2v", "i2v"] = "t2v"
    motion_score: float = 5.0
    # extension: the magic prompt strings; null keeps the released t2v/i2v defaults.
    positive_magic: Optional[str] = None
    negative_magic: Optional[str] = None
    # The guide's inference JSONs: video i starts from seed + i. An explicit --seed wins (arguments.py).
    seed: Optional[int] = None
    # extension: skip the DiT blocks after the first at steps whose first block changed less than this (relative
    # L1) since the last full step; 0 (the default) never skips and is exact. See docs/inference.md.
    first_block_cache_threshold: float = 0.0

    def validate(self) -> None:
        if not self.first_block_cache_threshold >= 0:
            raise ValueError(f"first_block_cache_threshold {self.first_block_cache_threshold} must be >= 0 (0: off).")
        if len(self.input_size) != 3:
            raise ValueError(f"input_size {self.input_size} must be [frames, height, width].")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed {self.seed} must be a non-negative integer (the guide uses 1234).")


@dataclass
class DPOConfig:
    histogram_path: str
    weight_alpha: float = 0.0
    weight_beta: Optional[float] = None
    loss_beta: float = 2000.0
    # extension: the frozen reference DiT. null: the weights the run starts from (--load, else
    # predictor.from_pretrained); a resumed run takes the one recorded in its checkpoint.
    reference_path: Optional[str] = None

    def validate(self) -> None:
        if not math.isfinite(self.weight_alpha):
            raise ValueError(f"weight_alpha {self.weight_alpha} must be a finite number (0 weighs every pair 1).")
        if self.weight_beta is not None and not (math.isfinite(self.weight_beta) and self.weight_beta > 0):
            raise ValueError(f"weight_beta {self.weight_beta} must be a positive number, or null for the "
                             f"histogram's max_num / total_num.")
        if not (math.isfinite(self.loss_beta) and self.loss_beta > 0):
            raise ValueError(f"loss_beta {self.loss_beta} must be a positive number (2000 in the recipe).")


@dataclass
class LoRAConfig:
    """extension: a LoRA adapter applied, unmerged, at inference (r, alpha and the layers come from its lora.json)."""
    path: Optional[str] = None  # a LoRA run's --save folder; --lora-load overrides it
    scale: float = 1.0  # multiplies alpha / r: 0 is the base, 1 the adapter as trained

    def validate(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"scale {self.scale} must be a finite number (1.0: the adapter as trained).")


@dataclass
class PatchConfig:
    # Run the VAE in float32 whatever `ae.dtype` says (MindSpeed-MM's patch): applied when the model JSON loads.
    ae_float32: bool = False


@dataclass
class MMModelConfig:
    """The whole `--mm-model` file; which sections are required depends on the entry point."""

    task: Optional[Literal["t2v", "i2v"]] = None
    load_video_features: bool = False
    load_text_features: bool = False
    enable_encoder_dp: bool = False
    predictor: Optional[PredictorConfig] = None
    diffusion: Optional[DiffusionConfig] = None
    text_encoder: Optional[List[TextEncoderConfig]] = None
    tokenizer: Optional[List[TokenizerConfig]] = None
    ae: Optional[AEConfig] = None
    dpo: Optional[DPOConfig] = None
    lora: Optional[LoRAConfig] = None
    patch: Optional[PatchConfig] = None
    pipeline_config: Optional[PipelineConfig] = None
    unload_text_encoder: bool = False
    # inference: the DiT's blocks stay in host memory, each copied to the device just before it runs
    dit_layerwise_offload: bool = False
    # inference: Step-LLM's layers likewise, while the prompts are encoded
    text_encoder_layerwise_offload: bool = False
    frame_interval: int = 1
    save_path: Optional[str] = None
    fps: int = 25
    prompt: Optional[str] = None
    image: Optional[str] = None
    num_inference_videos_per_sample: int = 1
    use_prompt_preprocess: bool = False
    pipeline_class: Literal["StepVideoPipeline"] = "StepVideoPipeline"
    device: Literal["npu", "cuda", "cpu", "auto"] = "auto"
    dtype: DtypeName = "bf16"
    # The guide's inference JSONs: videos per inference batch. An explicit --micro-batch-size wins (arguments.py).
    micro_batch_size: Optional[int] = None

    def validate(self) -> None:
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must be at least 1.")
        if self.patch is not None and self.patch.ae_float32 and self.ae is not None:
            self.ae.dtype = "fp32"
