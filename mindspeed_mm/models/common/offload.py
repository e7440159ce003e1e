"""Layer-wise CPU offload for inference: a stack of blocks kept in host memory, each copied onto the device just
before it runs and dropped right after, with the next block's copy overlapping the current block's compute.

    offload = LayerwiseOffload(dit.transformer_blocks, device)   # the blocks' weights move to (pinned) host memory
    ... run the model as usual ...
    offload.remove()                                             # weights back on the device, hooks gone

Why: the released DiT is 59 GB in bf16 and Step-LLM 39 GB, more than most single devices hold next to a 75,888-token
forward. With the blocks offloaded a device holds the parts outside the blocks, at most two blocks (the running one
and the prefetched next) and the activations. Every forward reads every block once over PCIe: about 60 GB for the DiT,
1.2 GB per block, against some 230 TFLOP of one block's compute at 75,888 tokens, so the copy hides behind the compute
on CUDA/NPU, where it runs on a side stream. On the CPU "device" the copies are no-ops: the mechanism still runs (and is
tested there), the saving needs an accelerator.

Inference only: the blocks must not require gradients (an autograd graph would keep every block's device copy alive).
The next block after the last is the first, so a denoising loop's next step starts with its first block already
copied; a skipped block (the step cache) is simply never loaded.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn


SLAB_BYTES = 1 << 30  # host buffers of at most 1 GiB, each an exact power of two
ALIGN_BYTES = 512


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def move_to_host_slabs(tensors, pin: bool, slab_bytes: int = SLAB_BYTES) -> Tuple[List[torch.Tensor], int]:
    """Move each of `tensors` (its `.data`) into host memory, as views into a few large buffers ("slabs"), one
    tensor at a time (so the host holds one extra tensor at most, not a second copy of them all); returns the views
    and the bytes the slabs hold.

    Why: torch's pinned (page-locked) allocator rounds every request up to a power of two, so pinning the DiT's
    tensors one by one (75, 151, 226 and 302 MB at the released width) would hold about 1.6x their size: 86 GiB for
    54 GiB of blocks. Slabs of exactly `slab_bytes` (smaller, still a power of two, for the last few bytes) are
    filled first-fit, wasting at most the tail of each."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    aligned = [-(-size // ALIGN_BYTES) * ALIGN_BYTES for size in sizes]
    left = sum(aligned)
    slabs: List[List] = []  # [buffer, bytes used]
    copies = []
    for tensor, size, need in zip(tensors, sizes, aligned):
        slab = next((s for s in slabs if s[1] + need <= s[0].numel()), None)
        if slab is None:
            capacity = max(_next_power_of_two(need), min(slab_bytes, _next_power_of_two(left)))
            slab = [torch.empty(capacity, dtype=torch.uint8, pin_memory=pin), 0]
            slabs.append(slab)
        view = slab[0][slab[1]:slab[1] + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        tensor.data = view  # the original storage goes once nothing else holds it
        slab[1] += need
        left -= need
        copies.append(view)
    return copies, sum(s[0].numel() for s in slabs)


def _device_module(device: torch.device):
    """torch.cuda / torch.npu for devices with streams, else None (copies run synchronously)."""
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type)
    return None


class LayerwiseOffload:
    def __init__(self, blocks: nn.ModuleList, device, pin_memory: Optional[bool] = None, prefetch: bool = True):
        self.blocks: List[nn.Module] = list(blocks)
        if not self.blocks:
            raise ValueError("layer-wise offload needs at least one block.")
        self.device = torch.device(device)
        for i, block in enumerate(self.blocks):
            trainable = [n for n, p in block.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"layer-wise offload is for inference: block {i} has parameters that require "
                                 f"gradients ({trainable[0]}, ...); call requires_grad_(False) first.")
        self._module = _device_module(self.device)
        pin = self._module is not None if pin_memory is None else pin_memory
        self.prefetch = prefetch
        # per block: (tensor whose .data is swapped, its host copy)
        tensors = [list(block.parameters()) + list(block.buffers()) for block in self.blocks]
        copies, self.slab_bytes = move_to_host_slabs([t for block in tensors for t in block], pin)
        done = iter(copies)
        self._host: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[(t, next(done)) for t in block]
                                                                     for block in tensors]
        self._stream = self._module.Stream(self.device) if self._module is not None else None
        self._ready: Dict[int, object] = {}  # block -> the copy stream's event after its copy
        self.resident: Set[int] = set()
        self.loads = 0  # copies made (a test and benchmark figure)
        self.max_resident = 0
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._before(i)))
            self._hooks.append(block.register_forward_hook(self._after(i)))

    def host_bytes(self) -> int:
        """The blocks' weights in bytes (the host buffers holding them: `slab_bytes`)."""
        return sum(host.numel() * host.element_size() for entries in self._host for _, host in entries)

    def _load(self, i: int) -> None:
        if i in self.resident:
            return
        if self._stream is None:
            for tensor, host in self._host[i]:
                tensor.data = host.to(self.device)
        else:
            with self._module.stream(self._stream):
                for tensor, host in self._host[i]:
                    tensor.data = host.to(self.device, non_blocking=True)
                self._ready[i] = self._stream.record_event()
        self.resident.add(i)
        self.loads += 1
        self.max_resident = max(self.max_resident, len(self.resident))

    def _release(self, i: int) -> None:
        if i not in self.resident:
            return
        for tensor, host in self._host[i]:
            tensor.data = host  # the device copy's last reference goes; the allocator reuses it
        self._ready.pop(i, None)
        self.resident.discard(i)

    def _before(self, i: int):
        def hook(module, args):
            if torch.is_grad_enabled():
                raise RuntimeError("layer-wise offload runs without autograd (torch.no_grad / inference_mode): with "
                                   "gradients every block's device copy would stay alive until backward.")
            nxt = (i + 1) % len(self.blocks)
            for j in list(self.resident):  # a block skipped by a cache, or a previous step's prefetch
                if j not in (i, nxt):
                    self._release(j)
            self._load(i)
            event = self._ready.pop(i, None)
            if event is not None:
                current = self._module.current_stream(self.device)
                current.wait_event(event)
                for tensor, _ in self._host[i]:
                    # made on the copy stream, used on this one: keep the allocator from reusing it too early
                    tensor.data.record_stream(current)
            if self.prefetch and nxt != i:
                self._load(nxt)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self._release(i)
        return hook

    def release_all(self) -> None:
        """Drop every device copy (the next forward copies its blocks in again)."""
        for i in list(self.resident):
            self._release(i)

    def remove(self) -> None:
        """Put every block back on the device and remove the hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for i, entries in enumerate(self._host):
            for tensor, host in entries:
                tensor.data = host.to(self.device)
        self.resident.clear()
        self._ready.clear()
