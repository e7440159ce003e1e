"""A training-free step cache for sampling: reuse the DiT blocks' work between denoising steps whose first block
barely changed (the idea of first-block cache / TeaCache).

    dit.step_cache = FirstBlockCache(threshold=0.05, groups=[tp_group, cp_group])
    ... sample ...
    dit.step_cache = None

At every step the first block runs. Its residual (output - input) is compared with the first block's residual at
the last step that ran every block: relative L1 change = sum |r - r_ref| / sum |r_ref| over all tokens (summed over
the tensor and context parallel groups and, under CFG parallel, the pair of halves, so every rank decides alike).
Below `threshold` the remaining blocks are skipped and their residual from that step is added instead; at or above
it every block runs and both residuals are stored. Consecutive skips compare with the same reference, so the change
accumulates until a full step is forced. A threshold of 0 never skips (the cache is then exact;
`StepVideoPipeline` does not install it at all).

Memory: two activations of the block stream (b, s_local, D) on top of sampling's own, at 75,888 tokens x 6144 in
bf16 with guidance about 1.9 GB each per rank at CP 1. Only for sampling: with gradients enabled the DiT ignores it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class FirstBlockCache:
    def __init__(self, threshold: float, groups: Sequence = ()):
        if not threshold >= 0:
            raise ValueError(f"the step-cache threshold {threshold} must be >= 0 (0 turns the cache off).")
        self.threshold = float(threshold)
        self.groups = [g for g in groups if g is not None and dist.get_world_size(g) > 1]
        self._first: Optional[torch.Tensor] = None  # the first block's residual at the last full step
        self._rest: Optional[torch.Tensor] = None  # the other blocks' residual at that step
        self.computed = 0
        self.reused = 0

    def _relative_change(self, first: torch.Tensor) -> float:
        sums = torch.stack([(first - self._first).abs().float().sum(), self._first.abs().float().sum()])
        for group in self.groups:
            dist.all_reduce(sums, group=group)
        return (sums[0] / sums[1].clamp_min(torch.finfo(torch.float32).tiny)).item()

    def run(self, blocks, x: torch.Tensor, *args) -> torch.Tensor:
        """The blocks on x (StepVideoTransformerBlock's arguments after x), skipping all but the first when the
        first block's change is below the threshold."""
        x1 = blocks[0](x, *args)
        first = x1 - x
        if (self._first is not None and self._first.shape == first.shape
                and self._relative_change(first) < self.threshold):
            self.reused += 1
            return x1 + self._rest
        out = x1
        for block in blocks[1:]:
            out = block(out, *args)
        self._first, self._rest = first, out - x1
        self.computed += 1
        return out
