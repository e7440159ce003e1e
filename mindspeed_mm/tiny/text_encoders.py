"""Tiny Step-LLM and HunyuanCLIP folders in the official download layout, with random weights.

Tests and the CPU demo load these through exactly the code that loads the real weights:

    write_tiny_step_llm("weights/step_llm")        # config.json, sharded safetensors + index,
                                                   # step1_chat_tokenizer.model (trained here)
    write_tiny_hunyuan_clip("weights/hunyuan_clip")  # clip_text_encoder/, tokenizer/
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable, List

import torch

from ..models.text_encoder.step_llm import StepLLMConfig, StepLLMEncoder, save_step_llm
from ..models.text_encoder.tokenizers import STEPCHAT_CONTROL_TOKENS, STEPCHAT_OTHER_TOKENS

# A small bilingual corpus, enough for SentencePiece to learn pieces for both scripts.
CORPUS: List[str] = [
    "A cat walks along a sunny windowsill and looks outside.",
    "A red car drives through a rainy city street at night.",
    "Waves crash on a rocky beach while seagulls fly overhead.",
    "A chef slices vegetables quickly on a wooden board.",
    "Two dogs run across a green park chasing a yellow ball.",
    "The camera slowly pans over snowy mountains at sunrise.",
    "A child blows bubbles in a garden full of flowers.",
    "An astronaut floats inside a space station, smiling.",
    "Leaves fall from a tall tree in the autumn wind.",
    "A drone shot of a river winding through a forest.",
    "一只猫沿着阳光明媚的窗台走动，向外张望。",
    "一辆红色的汽车在夜晚的雨中穿过城市街道。",
    "海浪拍打着岩石海滩，海鸥在头顶飞翔。",
    "厨师在木板上快速切着蔬菜。",
    "两只狗在绿色的公园里追逐一个黄色的球。",
    "镜头缓缓掠过日出时白雪覆盖的群山。",
    "一个孩子在开满鲜花的花园里吹泡泡。",
    "宇航员漂浮在空间站里，面带微笑。",
    "秋风中，树叶从高大的树上飘落。",
    "无人机拍摄河流蜿蜒穿过森林的画面。",
    "超高清、画面稳定、流畅动作、逼真的细节、专业级构图、自然、生动、清晰。",
    "画面暗、低分辨率、低质量、模糊、水印、文本、变形。",
]


def train_stepchat_tokenizer(path: str, corpus: Iterable[str] = CORPUS, vocab_size: int = 640) -> str:
    """Train a SentencePiece model in-process with StepChat's special tokens; ids 0/1/2 = unk/bos/eos."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=list(STEPCHAT_CONTROL_TOKENS),
        user_defined_symbols=list(STEPCHAT_OTHER_TOKENS),
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def write_tiny_step_llm(folder: str, hidden_size: int = 64, num_attention_heads: int = 4,
                        num_attention_groups: int = 2, num_layers: int = 2, ffn_hidden_size: int = 96,
                        num_shards: int = 2, seed: int = 0) -> StepLLMConfig:
    """A random Step-LLM in the official `step_llm/` layout (weights in bfloat16, as released)."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    tok_path = train_stepchat_tokenizer(os.path.join(folder, "step1_chat_tokenizer.model"))
    vocab = spm.SentencePieceProcessor(model_file=tok_path).get_piece_size()
    config = StepLLMConfig(
        hidden_size=hidden_size, num_attention_heads=num_attention_heads, num_attention_groups=num_attention_groups,
        num_layers=num_layers, ffn_hidden_size=ffn_hidden_size, padded_vocab_size=64 * -(-vocab // 64),
        layernorm_epsilon=1e-5, seq_length=320,
    )
    generator = torch.Generator().manual_seed(seed)
    model = StepLLMEncoder(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
    save_step_llm(model.to(torch.bfloat16), folder, num_shards=num_shards)
    return config


def _bert_vocab(corpus: Iterable[str]) -> List[str]:
    words, chars = set(), set()
    for line in corpus:
        for token in line.lower().replace(",", " ").replace(".", " ").split():
            if token.isascii():
                words.add(token)
        chars.update(ch for ch in line if not ch.isascii() and not ch.isspace())
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "，", "。", "、"] + letters
            + [f"##{ch}" for ch in letters] + sorted(words) + sorted(chars - set("，。、")))


def write_tiny_hunyuan_clip(folder: str, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                            seed: int = 0) -> int:
    """A random BERT in the official `hunyuan_clip/` layout; returns its hidden size."""
    from transformers import BertConfig, BertModel

    enc_dir, tok_dir = os.path.join(folder, "clip_text_encoder"), os.path.join(folder, "tokenizer")
    os.makedirs(enc_dir, exist_ok=True)
    os.makedirs(tok_dir, exist_ok=True)
    vocab = _bert_vocab(CORPUS)
    with open(os.path.join(tok_dir, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"do_lower_case": True, "tokenize_chinese_chars": True, "model_max_length": 77,
                   "tokenizer_class": "BertTokenizer"}, handle, indent=2)
    with open(os.path.join(tok_dir, "special_tokens_map.json"), "w", encoding="utf-8") as handle:
        json.dump({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "mask_token": "[MASK]"}, handle, indent=2)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
                        max_position_embeddings=128)
    model = BertModel(config).eval()
    config.save_pretrained(enc_dir)
    # The official folder ships pytorch_model.bin, so this one does too.
    torch.save(model.state_dict(), os.path.join(enc_dir, "pytorch_model.bin"))
    return hidden_size
