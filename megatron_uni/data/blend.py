"""Weighted blends of stored datasets, per training stage.

The blended document stream is deterministic in the seed: document k comes from the dataset whose
share lags most behind its weight (Megatron's greedy blending), and each dataset is read in a
seeded permutation reshuffled every epoch over that dataset.

A blend file (YAML) names datasets by prefix (relative to the file) with weights, either for one
stage or per stage::

    datasets: [{path: demo/demo, weight: 1.0}]
    # or
    stages:
      pretrain: [{path: text/web, weight: 0.7}, {path: images/t2i, weight: 0.3}]
      sft:      [{path: sft/chat, weight: 1.0}]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


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
            raise ValueError(f"blend {path}: choose a stage among {sorted(stages)} (got {stage!r})")
        entries, where = stages[stage], f"stages.{stage}"
    elif "datasets" in raw:
        entries, where = raw["datasets"], "datasets"
    else:
        raise ValueError(f"blend {path}: expected a 'datasets' list or a 'stages' mapping")
    return parse_entries(entries, os.path.dirname(os.path.abspath(path)), f"blend {path}: {where}")


def parse_entries(entries: Sequence, base_dir: str, context: str) -> List[BlendEntry]:
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{context}: expected a non-empty list of {{path, weight}}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {"path", "weight"}:
            raise ValueError(f"{context}[{i}]: expected exactly the keys path and weight, got {e!r}")
        if isinstance(e["weight"], bool) or not isinstance(e["weight"], (int, float)) or e["weight"] <= 0:
            raise ValueError(f"{context}[{i}].weight: expected a positive number, got {e['weight']!r}")
        path = e["path"] if os.path.isabs(e["path"]) else os.path.join(base_dir, e["path"])
        out.append(BlendEntry(path, float(e["weight"])))
    return out


def blended_documents(lengths: Sequence[np.ndarray], weights: Sequence[float],
                      seed: int) -> Iterator[Tuple[Tuple[int, int], int]]:
    """Endless stream of ``((dataset, document), length)``, deterministic in ``seed``."""
    if len(lengths) != len(weights) or not lengths:
        raise ValueError(f"{len(lengths)} datasets but {len(weights)} weights")
    empty = [i for i, l in enumerate(lengths) if len(l) == 0]
    if empty:
        raise ValueError(f"blend datasets {empty} are empty")
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    drawn = np.zeros(len(lengths), dtype=np.int64)
    orders: Dict[Tuple[int, int], np.ndarray] = {}
    k = 0
    while True:
        d = int(np.argmax(share * (k + 1) - drawn))
        n = len(lengths[d])
        epoch, offset = divmod(int(drawn[d]), n)
        if (d, epoch) not in orders:
            orders.pop((d, epoch - 1), None)
            orders[(d, epoch)] = np.random.default_rng([seed, d, epoch]).permutation(n)
        doc = int(orders[(d, epoch)][offset])
        drawn[d] += 1
        k += 1
        yield (d, doc), int(lengths[d][doc])
