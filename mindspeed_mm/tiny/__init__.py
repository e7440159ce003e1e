"""Tiny random weights in the official layouts, for the tests and the CPU demo (not user tools).

- `download.write_tiny_download` / `python -m mindspeed_mm.tiny.download OUT --task t2v|i2v`: a whole tiny
  official download (DiT, VAE, Step-LLM, HunyuanCLIP, tokenizers);
- `dit`, `vae`, `text_encoders`: the pieces alone.

They go through the same loaders as the real weights.
"""
