"""The two tokenizers: StepChat (SentencePiece) for Step-LLM and BertTokenizer for HunyuanCLIP.

Both are called as `tokenizer(prompts) -> (input_ids, attention_mask)`, int64 tensors of shape
(b, model_max_length), right-padded, mask 1 over real tokens.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch

from ...config.base import ConfigError
from ...checkpoint.safetensors_io import REDOWNLOAD_FIX, WeightsFileError, read_json_file
from ...checkpoint.official_layout import WeightsNotFoundError, require_path

# Must exist in step1_chat_tokenizer.model; the first six as control tokens (the official check).
STEPCHAT_CONTROL_TOKENS = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
STEPCHAT_OTHER_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


class StepChatTokenizer:
    """SentencePiece tokenizer of Step-LLM, called through `SentencePieceProcessor` directly.

    Encoding follows the released model: [BOS=1] + pieces[:max_len-2] + [EOS=2], right-padded with
    PAD=2 to `model_max_length`; the mask is 1 over BOS..EOS. The ids 1 and 2 are fixed by the model,
    not read from the SentencePiece file. No files are written.
    """

    BOS, EOS, PAD = 1, 2, 2

    def __init__(self, model_file: str, model_max_length: int = 320):
        import sentencepiece

        require_path(model_file, "StepChat tokenizer (step1_chat_tokenizer.model)")
        if model_max_length < 2:
            raise ConfigError(f"StepChat tokenizer: model_max_length {model_max_length} must leave room for BOS and "
                              f"EOS (>= 2); set the tokenizer's model_max_length in the model JSON (320).")
        self.model_file = model_file
        self.model_max_length = model_max_length
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except RuntimeError as exc:  # sentencepiece's only error type, for an unparsable model file
            raise WeightsFileError(
                f"StepChat tokenizer: cannot read '{model_file}' as a SentencePiece model ({exc}); the file is "
                f"truncated or is not step1_chat_tokenizer.model. {REDOWNLOAD_FIX}"
            ) from exc
        self._check_special_tokens()

    def _check_special_tokens(self) -> None:
        problems = []
        for token in STEPCHAT_CONTROL_TOKENS + STEPCHAT_OTHER_TOKENS:
            idx = self.sp.piece_to_id(token)
            if self.sp.id_to_piece(idx) != token:
                problems.append(f"{token} is missing")
            elif token in STEPCHAT_CONTROL_TOKENS and not self.sp.is_control(idx):
                problems.append(f"{token} is not a control token")
        if problems:
            raise WeightsFileError(
                f"{self.model_file} is not a StepChat tokenizer: {'; '.join(problems)}. Use the "
                f"step1_chat_tokenizer.model from the step_llm/ folder of the official download."
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> List[int]:
        return self.sp.encode_as_ids(text)

    def __call__(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.model_max_length
        ids, mask = [], []
        for text in prompts or [""]:
            tokens = [self.BOS] + self.tokenize(text)[: length - 2] + [self.EOS]
            valid = len(tokens)
            ids.append(tokens + [self.PAD] * (length - valid))
            mask.append([1] * valid + [0] * (length - valid))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


class BertPromptTokenizer:
    """HunyuanCLIP's BertTokenizer: max-length padding and truncation to `model_max_length` (77)."""

    def __init__(self, folder: str, model_max_length: int = 77):
        from transformers import BertTokenizer

        require_path(folder, "HunyuanCLIP tokenizer (hunyuan_clip/tokenizer)", is_dir=True)
        what = "HunyuanCLIP tokenizer"
        if not os.path.isfile(os.path.join(folder, "vocab.txt")):
            raise WeightsNotFoundError(f"{what}: '{folder}' has no vocab.txt; point from_pretrained at "
                                       f"hunyuan_clip/tokenizer of the official download.")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # name the file if one is damaged
            if os.path.isfile(os.path.join(folder, name)):
                read_json_file(os.path.join(folder, name), what)
        self.model_max_length = model_max_length
        self.tokenizer = BertTokenizer.from_pretrained(folder)

    def __call__(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.tokenizer(list(prompts), padding="max_length", max_length=self.model_max_length,
                             truncation=True, return_attention_mask=True, return_tensors="pt")
        return out.input_ids.long(), out.attention_mask.long()


def build_tokenizer(config) -> object:
    """A tokenizer from a `TokenizerConfig` (autotokenizer_name stepchat | BertTokenizer)."""
    if config.autotokenizer_name == "stepchat":
        return StepChatTokenizer(config.from_pretrained, config.model_max_length)
    if config.autotokenizer_name == "BertTokenizer":
        return BertPromptTokenizer(config.from_pretrained, config.model_max_length)
    raise ValueError(f"autotokenizer_name {config.autotokenizer_name!r} is not stepchat or BertTokenizer.")
