"""Text encoders and tokenizers: Step-LLM + StepChat tokenizer, HunyuanCLIP BERT."""
