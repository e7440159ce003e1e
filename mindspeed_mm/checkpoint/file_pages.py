"""Give back the host memory of a memory-mapped checkpoint file once its tensors have been copied.

`torch.load(path, mmap=True)` and safetensors (framework "pt") map the file and hand out tensors that are views of
the mapping: nothing is read until a tensor is used, so a rank that copies only its own tensors reads only those.
But every page a copy touches stays resident, and counts in the process's RSS, until the mapping goes away, and
the mapping lives as long as any tensor of the file does. Copying a checkpoint tensor by tensor would therefore end
with all of it resident beside its copy: twice the weights at the peak.

`FilePages(path).release(tensor)`, called after a tensor has been copied, drops the pages of that tensor's storage
with `madvise(MADV_DONTNEED)`. For a file mapping that is only read (what both loaders create, and we never write
to), the kernel reads a dropped page from the file again if it is touched again, so releasing never changes what a
tensor holds; it only bounds the peak to the copy plus one tensor.

Only pages inside a mapping of that very file (read from /proc/self/maps) are released. A tensor in ordinary memory
(an older safetensors that copies, a checkpoint that torch could not map) is left alone: dropping anonymous pages
would zero them. Off Linux, `release` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from functools import lru_cache
from typing import List, Optional, Tuple

import torch

_PAGE = mmap.PAGESIZE


@lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _file_mappings(path: str) -> List[Tuple[int, int]]:
    """[start, end) address ranges where this process maps `path`, adjacent entries merged."""
    ranges: List[Tuple[int, int]] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].rstrip("\n") != path:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], end)
                else:
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


class FilePages:
    """The mappings of one checkpoint file in this process; `release(tensor)` drops a copied tensor's pages."""

    def __init__(self, path):
        self.path = os.path.realpath(path)
        self._ranges: Optional[List[Tuple[int, int]]] = None  # read at first use: the file is mapped by then
        self.released_bytes = 0

    def _span(self, tensor: torch.Tensor) -> Optional[Tuple[int, int]]:
        """[start, end) of `tensor`'s storage when it lies in a mapping of this file; else None."""
        if tensor.device.type != "cpu":
            return None
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if self._ranges is None:
            self._ranges = _file_mappings(self.path)
        return (start, end) if any(lo <= start and end <= hi for lo, hi in self._ranges) else None

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is a view of this file's mapping (so not memory of its own)."""
        return self._span(tensor) is not None

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of `tensor`'s storage if it is a view of this file; the next read of them
        comes from the file again. Call it only once the tensor has been copied."""
        fn = _madvise()
        span = self._span(tensor) if fn is not None else None
        if span is None:
            return
        first = -(-span[0] // _PAGE) * _PAGE  # whole pages only: a page shared with a neighbour stays
        last = span[1] // _PAGE * _PAGE
        if last > first and fn(first, last - first, mmap.MADV_DONTNEED) == 0:
            self.released_bytes += last - first

    def copy(self, dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = 64 * 2**20) -> None:
        """`dst.copy_(src)` for a `src` read from this file, in slices along the first dimension, each slice's pages
        given back after its copy: the file's share of the peak is one slice, however large the tensor. (A strided
        `src`, e.g. a rank's columns, still faults in whole rows: the kernel maps the pages around each fault.)"""
        row_bytes = src.stride(0) * src.element_size() if src.dim() > 0 else 0
        if row_bytes <= 0 or not self.holds(src):
            dst.copy_(src)
            return
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, src.shape[0], step):
            piece = src[start:start + step]
            dst[start:start + step].copy_(piece)
            self._release_span(piece)
        self.release(src)  # the pages that straddle two slices

    def _release_span(self, view: torch.Tensor) -> None:
        """Drop the whole pages between the first and the last byte of `view` (positive strides)."""
        fn = _madvise()
        if fn is None or view.numel() == 0:
            return
        start = view.data_ptr()
        end = start + (1 + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))) * view.element_size()
        first = -(-start // _PAGE) * _PAGE
        last = end // _PAGE * _PAGE
        if last > first and fn(first, last - first, mmap.MADV_DONTNEED) == 0:
            self.released_bytes += last - first

    def release_all(self, tree) -> None:
        """`release` every tensor in nested dicts, lists and tuples (a loaded checkpoint or a part of it)."""
        if torch.is_tensor(tree):
            self.release(tree)
        elif isinstance(tree, dict):
            for value in tree.values():
                self.release_all(value)
        elif isinstance(tree, (list, tuple)):
            for value in tree:
                self.release_all(value)
