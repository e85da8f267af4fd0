"""Weighted blends of stored datasets, per training stage.

The blended document order is deterministic in the seed: document k comes from the dataset whose
share lags most behind its weight (Megatron's greedy blending), and each dataset is read in a
seeded permutation reshuffled every epoch over that dataset. It is computed a chunk of
documents at a time (:class:`BlendCursor`) for the row plan of :mod:`megatron_uni.data.row_plan`.

A blend file (YAML) names datasets by prefix (relative to the file) with weights, either for one
stage or per stage::

    datasets: [{path: demo/demo, weight: 1.0}]
    # or
    stages:
      pretrain: [{path: text/web, weight: 0.7}, {path: images/t2i, weight: 0.3}]
      sft:      [{path: sft/chat, weight: 1.0}]
"""

from __future__ import annotations

import array
import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_uni.errors import DataError


@dataclasses.dataclass(frozen=True)
class BlendEntry:
    path: str
    weight: float


def load_blend(path: str, stage: Optional[str] = None) -> List[BlendEntry]:
    """Read a blend YAML file; ``stage`` picks one entry of ``stages:``."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if "stages" in raw:
        stages = raw["stages"]
        if stage is None or stage not in stages:
            raise DataError(f"blend {path}: choose a stage among {sorted(stages)} (got {stage!r})")
        entries, where = stages[stage], f"stages.{stage}"
    elif "datasets" in raw:
        entries, where = raw["datasets"], "datasets"
    else:
        raise DataError(f"blend {path}: expected a 'datasets' list or a 'stages' mapping")
    return parse_entries(entries, os.path.dirname(os.path.abspath(path)), f"blend {path}: {where}")


def parse_entries(entries: Sequence, base_dir: str, context: str) -> List[BlendEntry]:
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{context}: expected a non-empty list of {{path, weight}}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"path", "weight"}:
            raise DataError(f"{context}[{i}]: expected exactly the keys path and weight, got {e!r}")
        if isinstance(e["weight"], bool) or not isinstance(e["weight"], (int, float)) or e["weight"] <= 0:
            raise DataError(f"{context}[{i}].weight: expected a positive number, got {e['weight']!r}")
        path = e["path"] if os.path.isabs(e["path"]) else os.path.join(base_dir, e["path"])
        out.append(BlendEntry(path, float(e["weight"])))
    return out


def blend_order(sizes: Sequence[int], weights: Sequence[float], seed: int,
                count: int) -> Tuple[np.ndarray, np.ndarray]:
    """The first ``count`` documents of the blend: ``(dataset int16 [count], document int64 [count])``."""
    return BlendCursor(sizes, weights, seed).take(count)


class BlendCursor:
    """Walks the blend a chunk at a time: ``take(n)`` returns the next ``n`` documents, so a
    plan of any length is built in bounded memory; the chunks concatenate to ``blend_order``."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int) -> None:
        if len(sizes) != len(weights) or not len(sizes):
            raise DataError(f"{len(sizes)} datasets but {len(weights)} weights")
        empty = [i for i, n in enumerate(sizes) if n == 0]
        if empty:
            raise DataError(f"blend datasets {empty} are empty")
        self.sizes, self.seed = [int(n) for n in sizes], seed
        self.share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.drawn = [0] * len(sizes)            # documents taken from each dataset so far
        self._order: dict = {}                   # dataset -> (epoch, its permutation)

    def take(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        before = list(self.drawn)
        dataset = greedy_blend(self.share, count, self.drawn)
        document = np.empty(count, np.int64)
        for d, size in enumerate(self.sizes):
            picks = np.flatnonzero(dataset == d)
            if not len(picks):
                continue
            epoch, offset = np.divmod(before[d] + np.arange(len(picks)), size)
            epochs = range(int(epoch[0]), int(epoch[-1]) + 1)
            bounds = np.searchsorted(epoch, [*epochs, epochs.stop])      # epochs are consecutive
            for e, lo, hi in zip(epochs, bounds[:-1], bounds[1:]):
                document[picks[lo:hi]] = self._permutation(d, e)[offset[lo:hi]]
        return dataset, document

    def _permutation(self, d: int, epoch: int) -> np.ndarray:
        if self._order.get(d, (None,))[0] != epoch:
            self._order[d] = (epoch, np.random.default_rng([self.seed, d, epoch]).permutation(self.sizes[d]))
        return self._order[d][1]


def greedy_blend(share: np.ndarray, count: int, drawn: Optional[List[int]] = None) -> np.ndarray:
    """Dataset of each of the first ``count`` documents: document k comes from
    ``argmax(share * (k + 1) - drawn)`` (the dataset lagging most behind its share; lowest index
    on ties), as megatron blends.

    A plain loop on Python floats (the same IEEE operations as numpy's, so the same ties): shares
    that are exact ratios (0.7/0.3) tie in exact arithmetic every few steps and floating point
    breaks those ties, which defeats a vectorised merge; the loop costs ~1 s per million documents."""
    shares = share.tolist()
    drawn = [0] * len(share) if drawn is None else drawn   # counts so far; updated in place
    done = sum(drawn)
    out = array.array("h", bytes(2 * count))
    others = range(1, len(shares))
    for k in range(count):
        step = done + k + 1
        best, best_lag = 0, shares[0] * step - drawn[0]
        for d in others:
            lag = shares[d] * step - drawn[d]
            if lag > best_lag:
                best, best_lag = d, lag
        drawn[best] += 1
        out[k] = best
    return np.frombuffer(out, np.int16)
