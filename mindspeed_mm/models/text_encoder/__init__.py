"""Text encoders and tokenizers: Step-LLM + StepChat tokenizer, HunyuanCLIP BERT."""

from .hunyuan_clip import HunyuanClipEncoder
from .prompt_encoder import StepVideoTextEncoder
from .step_llm import StepLLMConfig, StepLLMEncoder
from .tokenizers import BertPromptTokenizer, StepChatTokenizer, build_tokenizer

__all__ = [
    "BertPromptTokenizer",
    "HunyuanClipEncoder",
    "StepChatTokenizer",
    "StepLLMConfig",
    "StepLLMEncoder",
    "StepVideoTextEncoder",
    "build_tokenizer",
]
