"""Cross-attention with a dense key mask against variable-length attention (models/common/attention.py), on this
machine's CPU, SDPA backend.

    python benchmarks/cross_attention_varlen.py [--tokens 4096] [--heads 8] [--repeats 5]

The sampling case: batch 2 with guidance, the prompt's text keys (CLIP 77 + Step-LLM `--prompt-len`) and the empty
prompt's (77 + 1), padded to the longer one; then the training case of one length (CP padding), where the keys are
cut once. Prints the median time of each path and the ratio, and the largest difference between them. On a GPU the
gain is larger: the masked call cannot use flash attention at all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mindspeed_mm.models.common.attention import attention, sdpa_attention  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(label: str, q, k, v, mask, repeats: int) -> str:
    with torch.no_grad():
        masked = _median_seconds(lambda: sdpa_attention(q, k, v, mask), repeats)
        varlen = _median_seconds(lambda: attention(q, k, v, mask, backend="sdpa"), repeats)
        diff = (attention(q, k, v, mask, backend="sdpa") - sdpa_attention(q, k, v, mask)).abs().max().item()
    return (f"| {label} | {masked * 1e3:.1f} | {varlen * 1e3:.1f} | {masked / varlen:.2f}x | {diff:.1e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="queries per sample")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=60, help="the prompt's Step-LLM tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    s_k = 77 + args.prompt_len
    q = torch.randn(2, args.tokens, args.heads, args.head_dim, dtype=dtype)
    k, v = (torch.randn(2, s_k, args.heads, args.head_dim, dtype=dtype) for _ in range(2))
    ragged = torch.arange(s_k)[None] < torch.tensor([s_k, 78])[:, None]
    padded_keys = torch.randn(2, args.tokens, args.heads, args.head_dim, dtype=dtype)
    cp_padding = torch.arange(args.tokens)[None].expand(2, -1) < args.tokens - args.tokens // 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.heads} heads x "
          f"{args.head_dim}, {args.tokens} queries per sample, batch 2")
    print("| case | dense mask (ms) | variable length (ms) | speed-up | max difference |")
    print("|---|---:|---:|---:|---:|")
    print(compare(f"cross-attention, keys {s_k} and 78 of {s_k}", q, k, v, ragged, args.repeats))
    print(compare("self-attention, last 1/8 of the keys padding", q, padded_keys, padded_keys, cp_padding,
                  args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
