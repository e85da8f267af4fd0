"""Deterministic, resumable, data-parallel row sampler.

A "sample" is one packed row. The row sequence is a pure function of (datasets, weights, seed,
packing settings), so the sampler's whole state is ``consumed_samples`` (rows taken by ALL
data-parallel ranks) and the seed; restoring it replays the exact remaining order, also on a
different data-parallel size. Each micro-batch step takes ``micro_batch_size * dp_world`` rows:
rank r reads rows ``[consumed + r * mbs, consumed + (r + 1) * mbs)``; ranks are disjoint and
together cover every row once.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from megatron_uni.data.packing import PackingStats, Segment


class RowPlan:
    """Rows planned lazily from an endless row iterator, kept for random access."""

    def __init__(self, rows: Iterator[List[Segment]], stats: PackingStats) -> None:
        self._rows = rows
        self._plan: List[List[Segment]] = []
        self.stats = stats

    def __getitem__(self, index: int) -> List[Segment]:
        while len(self._plan) <= index:
            self._plan.append(next(self._rows))
        return self._plan[index]


class ResumableSampler:
    def __init__(self, micro_batch_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
                 consumed_samples: int = 0) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"data-parallel rank {dp_rank} outside world of {dp_world}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.consumed_samples = consumed_samples

    def next_rows(self) -> List[int]:
        """Row indices of this rank's next micro-batch; advances the global count."""
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        self.consumed_samples += self.micro_batch_size * self.dp_world
        return list(range(first, first + self.micro_batch_size))

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            yield self.next_rows()

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.consumed_samples = int(state["consumed_samples"])
