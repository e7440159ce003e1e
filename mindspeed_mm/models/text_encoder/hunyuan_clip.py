"""HunyuanCLIP: the Chinese BERT of StepVideo, through transformers' BertModel, in float32."""

from __future__ import annotations

import logging
import os
import pickle
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from torch import nn

from ...checkpoint.megatron_layout import describe_torch_load_error
from ...checkpoint.safetensors_io import (REDOWNLOAD_FIX, CheckpointMismatchError, WeightsFileError,
                                     describe_safetensors_error, read_json_file)
from ..registry import register_model
from ...checkpoint.official_layout import OFFICIAL_LAYOUT, WeightsNotFoundError, require_file, require_path

logger = logging.getLogger(__name__)

# The weight files transformers' BertModel.from_pretrained reads from a local folder, in its order.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _weights_file(folder: str, what: str) -> str:
    for name in WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise WeightsNotFoundError(
        f"{what}: '{folder}' has config.json but no weights ({' or '.join(WEIGHT_NAMES)}).\n{OFFICIAL_LAYOUT}\n"
        f"Finish the download of clip_text_encoder/."
    )


def _describe_load_failure(exc: BaseException) -> Optional[str]:
    """Why transformers could not read the folder's files, in words; None when the cause is not a file."""
    if isinstance(exc, SafetensorError):
        return describe_safetensors_error(exc)
    return describe_torch_load_error(exc)


@register_model("BertModel")
class HunyuanClipEncoder(nn.Module):
    """(b, 77) ids + mask -> `last_hidden_state` (b, 77, 1024). The pooled output is not used."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    @classmethod
    def from_pretrained(cls, folder: str, dtype: Union[str, torch.dtype, None] = torch.float32,
                        device: Union[str, torch.device, None] = None) -> "HunyuanClipEncoder":
        from transformers import BertModel

        from ...config.model import torch_dtype

        what = "HunyuanCLIP text encoder (hunyuan_clip/clip_text_encoder)"
        require_path(folder, what, is_dir=True)
        read_json_file(require_file(folder, "config.json", what), what)  # names the file if it is damaged
        weights = _weights_file(folder, what)
        if weights.endswith(".json"):
            read_json_file(weights, what)
        dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
        try:
            bert, info = BertModel.from_pretrained(folder, output_loading_info=True, dtype=dtype or torch.float32)
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, SafetensorError) as exc:
            problem = _describe_load_failure(exc)
            if problem is None:
                raise
            raise WeightsFileError(f"{what}: cannot load '{weights}': {problem}. {REDOWNLOAD_FIX}") from exc
        # transformers fills missing weights with random values and only warns; we refuse.
        missing = sorted(info.get("missing_keys", []))
        mismatched = info.get("mismatched_keys", [])
        if missing or mismatched:
            raise CheckpointMismatchError(
                f"{what}: {folder} does not match its config.json: missing keys {missing[:20]}, "
                f"shape mismatches {list(mismatched)[:20]}. Re-download clip_text_encoder."
            )
        if info.get("unexpected_keys"):
            logger.info("HunyuanCLIP: ignoring checkpoint keys the BertModel does not use: %s",
                        sorted(info["unexpected_keys"])[:10])
        model = cls(bert)
        if device is not None:
            model.to(device)
        return model.eval().requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
