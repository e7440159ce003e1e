"""How the sequence is parallelised, set once per job by `runtime.initialize_runtime`.

Megatron-core's `parallel_state` owns the process groups (TP, CP, and for the hybrid algorithm the two
hierarchical CP levels); these are the choices that go with them and are not groups:

- `context_parallel_algo`: MindSpeed's names. `ulysses_cp_algo` (all-to-all of heads, the default),
  `megatron_cp_algo` (ring attention over the CP group), `hybrid_cp_algo` (Ulysses inside groups of
  `ulysses_degree` consecutive CP ranks, ring across them).
- `sequence_parallel`: Megatron's sequence parallel, the token axis split over the TP group outside the
  tensor-parallel matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")


@dataclass(frozen=True)
class SequenceParallelOptions:
    context_parallel_algo: str = "ulysses_cp_algo"
    ulysses_degree: Optional[int] = None  # hybrid_cp_algo only: the Ulysses group size inside CP
    sequence_parallel: bool = False

    def ulysses_size(self, cp: int) -> int:
        """Ranks that exchange heads by all-to-all: all of CP (Ulysses), none (ring), or the inner groups."""
        if self.context_parallel_algo == "ulysses_cp_algo":
            return cp
        if self.context_parallel_algo == "megatron_cp_algo":
            return 1
        return self.ulysses_degree or 1

    def ring_size(self, cp: int) -> int:
        return cp // self.ulysses_size(cp)


_OPTIONS = SequenceParallelOptions()


def set_sequence_parallel_options(options: SequenceParallelOptions) -> None:
    if options.context_parallel_algo not in CP_ALGOS:
        raise ValueError(f"unknown context_parallel_algo {options.context_parallel_algo!r}; one of {CP_ALGOS}")
    global _OPTIONS
    _OPTIONS = options


def get_sequence_parallel_options() -> SequenceParallelOptions:
    return _OPTIONS
