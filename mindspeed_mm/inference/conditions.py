"""The text conditions of a sampling call: the released magic strings (`POSITIVE_MAGIC`, `NEGATIVE_MAGIC`,
`magic_strings`), the texts the encoders see (`conditioning_texts`: each prompt + the positive suffix, the negative
string alone as the unconditional prompt) and their encoded states (`encode_conditions` -> `TextConditions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .errors import InferenceConfigError

# Magic prompt strings of the released pipelines (reference §13): appended to every prompt / used alone as
# the unconditional prompt. Configurable through the pipeline's positive_magic / negative_magic.
POSITIVE_MAGIC = {
    "t2v": "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、"
           "专业级构图、超现实主义、自然、生动、超细节、清晰。",
    "i2v": "画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、"
           "大师级运镜、整体不变形、超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。",
}
NEGATIVE_MAGIC = {
    "t2v": "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、"
           "颗粒状、签名、水印、用户名、模糊。",
    "i2v": "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、"
           "扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指",
}


@dataclass
class TextConditions:
    """Encoded prompts in the DiT's contract, plus the negative prompt's states (one row) for guidance."""

    prompt: List[torch.Tensor]                 # [llm (n, L1, C1), clip (n, L2, C2)]
    mask: List[torch.Tensor]                   # [(n, L1), (n, L2)]
    negative_prompt: Optional[List[torch.Tensor]] = None   # [(1, L1, C1), (1, L2, C2)]; None without guidance
    negative_mask: Optional[List[torch.Tensor]] = None

    def __len__(self) -> int:
        return self.prompt[0].shape[0]

    def select(self, rows: Sequence[int]) -> "TextConditions":
        """The conditions of prompts `rows` (in that order; repeats allowed)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.prompt[0].device)
        return TextConditions([t.index_select(0, index) for t in self.prompt],
                              [m.index_select(0, index.to(m.device)) for m in self.mask],
                              self.negative_prompt, self.negative_mask)

    def model_inputs(self, guided: bool):
        """(prompt, prompt_mask) for the DiT: [cond; uncond expanded to the batch] with guidance, cond alone without."""
        if not guided:
            return list(self.prompt), list(self.mask)
        if self.negative_prompt is None:
            raise ValueError("guidance needs the negative prompt's states; encode with guidance_scale > 1.")
        b = len(self)
        prompt = [torch.cat([c, n.to(c.device).expand(b, *n.shape[1:])]) for c, n in
                  zip(self.prompt, self.negative_prompt)]
        mask = [torch.cat([c, n.to(c.device).expand(b, *n.shape[1:])]) for c, n in zip(self.mask, self.negative_mask)]
        return prompt, mask


def magic_strings(model_type: str, positive: Optional[str] = None, negative: Optional[str] = None):
    """(positive suffix, negative prompt): the given strings, or the released defaults of `model_type`."""
    if model_type not in POSITIVE_MAGIC:
        raise InferenceConfigError(f"pipeline_config.model_type {model_type!r} must be 't2v' or 'i2v'.")
    return (POSITIVE_MAGIC[model_type] if positive is None else positive,
            NEGATIVE_MAGIC[model_type] if negative is None else negative)


def conditioning_texts(prompts: Sequence[str], positive_magic: str, negative_magic: str):
    """([prompt + positive_magic, ...], negative_magic): plain concatenation, as the official pipelines."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return [p + positive_magic for p in prompts], negative_magic


@torch.no_grad()
def encode_conditions(text_encoder, prompts: Sequence[str], positive_magic: str, negative_magic: str,
                      guided: bool = True, batch_size: Optional[int] = None) -> TextConditions:
    """Both encoders on `[p + positive_magic ...] (+ [negative_magic] when guided)` in one call."""
    texts, negative = conditioning_texts(prompts, positive_magic, negative_magic)
    n = len(texts)
    if guided:
        texts = texts + [negative]
    prompt, mask = text_encoder(texts, batch_size=batch_size)
    if not guided:
        return TextConditions(prompt, mask)
    return TextConditions([t[:n] for t in prompt], [m[:n] for m in mask],
                          [t[n:] for t in prompt], [m[n:] for m in mask])
