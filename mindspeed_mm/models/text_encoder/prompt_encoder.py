"""One text-encoding API for feature extraction, training on raw videos and inference.

    encoder = StepVideoTextEncoder.from_configs(model_json.text_encoder, model_json.tokenizer)
    prompt, prompt_mask = encoder(["a cat", "一只猫"])
    # prompt      = [llm_states (b, 320, 6144), clip_states (b, 77, 1024)]
    # prompt_mask = [(b, 320), (b, 77)]  int64, 1 = real token

This is the DiT's input contract. The DiT itself decides which masks it uses (the Step-LLM
mask, with every CLIP position attended, as the released model was trained).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...config.base import ConfigError
from ..common.offload import LayerwiseOffload
from .hunyuan_clip import HunyuanClipEncoder
from .step_llm import StepLLMEncoder
from .tokenizers import BertPromptTokenizer, StepChatTokenizer, build_tokenizer

# The order of both lists in the seed's JSON files: Step-LLM first, HunyuanCLIP second.
_EXPECTED = (("StepLLmModel", "stepchat"), ("BertModel", "BertTokenizer"))


def _pairing_error(what: str, got: list) -> ConfigError:
    want = [m for m, _ in _EXPECTED] if what == "text_encoder" else [t for _, t in _EXPECTED]
    key = "model_id" if what == "text_encoder" else "autotokenizer_name"
    return ConfigError(
        f"the {what} list must hold two entries with {key} {want[0]!r} then {want[1]!r} (StepVideo conditions on "
        f"Step-LLM and HunyuanCLIP together); got {got}."
    )


class StepVideoTextEncoder(nn.Module):
    """Step-LLM + HunyuanCLIP with their tokenizers; see the module docstring."""

    def __init__(self, llm: StepLLMEncoder, clip: HunyuanClipEncoder, llm_tokenizer: StepChatTokenizer,
                 clip_tokenizer: BertPromptTokenizer, device: Optional[torch.device] = None,
                 unload_after_use: bool = False, layerwise_offload: bool = False):
        super().__init__()
        self.llm, self.clip = llm, clip
        self.llm_tokenizer, self.clip_tokenizer = llm_tokenizer, clip_tokenizer
        self.device = torch.device(device) if device is not None else None
        self.unload_after_use = unload_after_use
        # Step-LLM's layers stay in host memory and visit the device one at a time (models/common/offload.py)
        self.layerwise_offload = layerwise_offload
        self.llm_offload: Optional[LayerwiseOffload] = None

    @classmethod
    def from_configs(cls, text_encoder: Sequence, tokenizer: Sequence, device=None,
                     unload_after_use: bool = False, layerwise_offload: bool = False) -> "StepVideoTextEncoder":
        """Build from the `text_encoder` and `tokenizer`/`tokenizer_config` lists of the seed's JSON."""
        encoders, tokenizers = list(text_encoder or []), list(tokenizer or [])
        if [e.model_id for e in encoders] != [m for m, _ in _EXPECTED]:
            raise _pairing_error("text_encoder", [e.model_id for e in encoders])
        if [t.autotokenizer_name for t in tokenizers] != [t for _, t in _EXPECTED]:
            raise _pairing_error("tokenizer", [t.autotokenizer_name for t in tokenizers])
        # Step-LLM straight onto its device, shard by shard (the host never holds its 39 GB), unless its layers
        # are to stay in host memory anyway
        llm = StepLLMEncoder.from_pretrained(encoders[0].from_pretrained, dtype=encoders[0].dtype,
                                             device=None if layerwise_offload else device)
        clip = HunyuanClipEncoder.from_pretrained(encoders[1].from_pretrained, dtype=encoders[1].dtype)
        return cls(llm, clip, build_tokenizer(tokenizers[0]), build_tokenizer(tokenizers[1]),
                   device=device, unload_after_use=unload_after_use, layerwise_offload=layerwise_offload)

    def tokenize(self, prompts: Sequence[str]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """[llm ids (b, 320), clip ids (b, 77)], [llm mask, clip mask]."""
        llm_ids, llm_mask = self.llm_tokenizer(prompts)
        clip_ids, clip_mask = self.clip_tokenizer(prompts)
        return [llm_ids, clip_ids], [llm_mask, clip_mask]

    def _to(self, device) -> None:
        """Both encoders to `device`; with layerwise_offload Step-LLM's layers stay where the offload keeps them."""
        self.clip.to(device)
        if not self.layerwise_offload:
            self.llm.to(device)
            return
        if self.llm_offload is None:
            self.llm_offload = LayerwiseOffload(self.llm.transformer.layers, device)
        for name, child in self.llm.named_children():
            if name != "transformer":
                child.to(device)

    def offload(self) -> None:
        """Move both encoders to the CPU, freeing the accelerator (the seed's unload_text_encoder)."""
        self._to("cpu")
        if self.llm_offload is not None:
            self.llm_offload.release_all()

    @torch.no_grad()
    def encode_tokens(self, ids: List[torch.Tensor], masks: List[torch.Tensor], batch_size: Optional[int] = None
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Run both encoders on tokenized prompts, `batch_size` prompts at a time."""
        device = self.device or next(self.llm.parameters()).device
        if self.llm_offload is not None and self.llm_offload.device != torch.device(device):
            raise ValueError(f"Step-LLM's layers are offloaded for {self.llm_offload.device}, not {device}.")
        self._to(device)
        total = ids[0].shape[0]
        step = batch_size or total
        llm_out, clip_out = [], []
        for start in range(0, total, step):
            part = slice(start, start + step)
            llm_out.append(self.llm(ids[0][part].to(device), masks[0][part].to(device)))
            clip_out.append(self.clip(ids[1][part].to(device), masks[1][part].to(device)))
        if self.unload_after_use:
            self.offload()
        return [torch.cat(llm_out), torch.cat(clip_out)], [masks[0].to(device), masks[1].to(device)]

    def forward(self, prompts: Sequence[str], batch_size: Optional[int] = None
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Prompts -> (prompt, prompt_mask) in the DiT's contract."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, masks = self.tokenize(prompts)
        return self.encode_tokens(ids, masks, batch_size=batch_size)
