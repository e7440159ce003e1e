"""What autograd keeps: the bytes of the tensors a DiT's forward saves for backward, per transformer block."""

from __future__ import annotations

from typing import List, Tuple

import torch


def saved_bytes_per_block(dtype: str, layers: int = 2, frames: int = 4, height: int = 6, width: int = 6,
                          llm_tokens: int = 20, clip_tokens: int = 7) -> Tuple[List[int], object, object]:
    """(bytes saved inside each block, the DiTShape, the Workload) of one forward at a small size with the real
    head_dim, in the current parallel state. Parameters are excluded; a storage counts once, in the block that
    first saves it (so block 0 also holds what all blocks share: RoPE tables, text states)."""
    from mindspeed_mm.config.model import PredictorConfig
    from mindspeed_mm.models.predictor import StepVideoDiT
    from mindspeed_mm.tools.memory_plan import DiTShape, Workload

    torch.manual_seed(0)
    cfg = PredictorConfig(num_layers=layers, num_heads=2, head_dim=128, caption_channels=[64, 32], dtype=dtype,
                          attention_backend="sdpa")
    dit = StepVideoDiT.build(cfg, device="cpu")
    params = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    where, seen = ["outside"], {}
    for i, block in enumerate(dit.transformer_blocks):
        block.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        block.register_forward_hook(lambda *_: where.__setitem__(0, "outside"))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), (storage.nbytes(), where[0]))
        return tensor

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, frames, 64, height, width, generator=g)
    prompt = [torch.randn(1, llm_tokens, 64, generator=g), torch.randn(1, clip_tokens, 32, generator=g)]
    masks = [torch.ones(1, llm_tokens, dtype=torch.long), torch.ones(1, clip_tokens, dtype=torch.long)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dit(latents, torch.tensor(0.5), prompt, masks)
    per_block = [sum(n for n, w in seen.values() if w == i) for i in range(layers)]
    workload = Workload(1, frames, height, width, llm_tokens=llm_tokens, clip_tokens=clip_tokens)
    return per_block, DiTShape.from_config(cfg), workload
