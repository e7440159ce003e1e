"""HunyuanCLIP: the Chinese BERT of StepVideo, through transformers' BertModel, in float32."""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn

from ..registry import register_model
from ..weights_layout import require_file, require_path

logger = logging.getLogger(__name__)


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
        require_file(folder, "config.json", what)
        dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
        bert, info = BertModel.from_pretrained(folder, output_loading_info=True, dtype=dtype or torch.float32)
        # transformers fills missing weights with random values and only warns; we refuse.
        missing = sorted(info.get("missing_keys", []))
        mismatched = info.get("mismatched_keys", [])
        if missing or mismatched:
            raise ValueError(
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
