"""Stored datasets -> packed rows addressed by index -> :class:`Batch`.

    loader = PackedBatchLoader.open(blend, vocab, PackingSettings(seq_length, block_size), seed=1234)
    batch = loader.rows(microbatch_rows(iteration, k, dp_rank, dp_size, mbs, global_batch))

Rows come from the run's cached row plan (:mod:`megatron_uni.data.row_plan`), so row ``i`` is the
same in every process and at every data-parallel size, and resuming needs only the iteration.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_uni.data.batch import BATCH_FIELDS, Batch
from megatron_uni.data.blend import BlendEntry, load_blend
from megatron_uni.data.packing import PackingSettings, PackingStats, Segment, materialize_row
from megatron_uni.data.row_plan import PlanInputs, open_row_plan
from megatron_uni.data.storage import SampleDataset
from megatron_uni.errors import DataError
from megatron_uni.tokens import Vocabulary


LAYOUT_KEYS = ("text_size", "num_image_codes", "special_ids")
CACHE_SUBDIR = "row_plans"       # beside the first dataset, unless data.cache_dir names a directory
DEFAULT_PLANNED_ROWS = 1 << 14   # rows planned when the caller does not say how many it will read


def check_built_vocabulary(prefix: str, vocab: Vocabulary) -> None:
    """Compare the layout recorded in ``prefix.build.json`` (when present) with ``vocab``."""
    path = prefix + ".build.json"
    if not os.path.isfile(path):
        return
    with open(path) as f:
        built = json.load(f).get("vocabulary")
    if built is None:
        return
    mine = vocab.layout().to_dict()
    for key in LAYOUT_KEYS:
        if built[key] != mine[key]:
            raise DataError(f"dataset {prefix!r} was built with {key}={built[key]}, this run uses {mine[key]}: "
                             f"rebuild it with this tokenizer")


def collate(rows: Sequence[Dict[str, np.ndarray]]) -> Batch:
    return Batch(**{name: torch.from_numpy(np.stack([r[name] for r in rows])).to(dtype)
                    for name, dtype in BATCH_FIELDS.items()})


class PackedBatchLoader:
    """Random access to the packed rows of a run: ``rows(indices)`` is a :class:`Batch`."""

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float], vocab: Vocabulary,
                 packing: PackingSettings, seed: int, cache_dir: Optional[str] = None,
                 rows: int = DEFAULT_PLANNED_ROWS) -> None:
        self.datasets, self.vocab, self.packing = list(datasets), vocab, packing
        self._check_vocab()
        self.inputs = PlanInputs([d.lengths for d in self.datasets], list(weights), seed, packing,
                                 [d.prefix for d in self.datasets])
        self.cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.datasets[0].prefix)),
                                                   CACHE_SUBDIR)
        self.plan = open_row_plan(self.inputs, self.cache_dir, rows)

    @classmethod
    def open(cls, blend: Sequence[BlendEntry], vocab: Vocabulary, packing: PackingSettings, seed: int,
             cache_dir: Optional[str] = None, rows: int = DEFAULT_PLANNED_ROWS) -> "PackedBatchLoader":
        datasets = [SampleDataset(e.path) for e in blend]
        return cls(datasets, [e.weight for e in blend], vocab, packing, seed, cache_dir, rows)

    def _check_vocab(self) -> None:
        """Fail early (naming the dataset) when it was built with another vocabulary layout."""
        for data in self.datasets:
            if len(data) == 0:
                raise DataError(f"dataset {data.prefix!r} is empty")
            check_built_vocabulary(data.prefix, self.vocab)
            # spot check for datasets without build.json: ids of the longest document must fit
            highest = int(data.get(int(np.argmax(data.lengths))).tokens.max())
            if highest >= self.vocab.size:
                raise DataError(f"dataset {data.prefix!r} holds token id {highest} >= vocabulary size "
                                 f"{self.vocab.size}: built with another tokenizer?")

    def _fetch(self, ref, start: int, end: int):
        dataset, document = ref
        return self.datasets[dataset].get(document, offset=start, length=end - start)

    def segments(self, index: int) -> List[Segment]:
        """The document pieces of row ``index``; a run longer than the plan extends it (this
        process alone, under the file lock: no collective call mid-run)."""
        if index >= self.plan.rows:
            self.plan = open_row_plan(self.inputs, self.cache_dir, max(2 * self.plan.rows, index + 1),
                                      collective=False)
        return self.plan.row(index)

    def row(self, index: int) -> Dict[str, np.ndarray]:
        return materialize_row(self.segments(index), self._fetch, self.packing, self.vocab.pad_id)

    def rows(self, indices: List[int]) -> Batch:
        return collate([self.row(i) for i in indices])

    @property
    def stats(self) -> PackingStats:
        """Packing statistics of the planned rows (efficiency counts padding and lost tokens)."""
        return self.plan.stats

    def packing_summary(self) -> str:
        """One line for the start of training: the settings and the statistics of the plan."""
        p = self.packing
        return (f"packing seq {p.seq_length} block {p.block_size} lookahead {p.lookahead} "
                f"split_samples {p.split_samples} overlong {p.overlong}: {self.stats.summary()} "
                f"(plan {self.plan.path})")


def blend_from_path(path: str, stage: Optional[str] = None) -> List[BlendEntry]:
    """A blend YAML file (``.yaml``/``.yml``) or a single dataset prefix (weight 1)."""
    if path.endswith((".yaml", ".yml")):
        return load_blend(path, stage)
    return [BlendEntry(path, 1.0)]


def open_training_data(data_cfg, model_cfg, stage: Optional[str] = None,
                       rows: int = DEFAULT_PLANNED_ROWS) -> PackedBatchLoader:
    """Loader from the recipe's ``data`` section (path, tokenizer, seq_length, block_size, seed,
    lookahead, split_samples, overlong, cache_dir) and ``model`` section (text_vocab,
    num_image_codes); the row plan covers at least ``rows`` rows (the run's iterations x global batch)."""
    if not data_cfg.path or not data_cfg.tokenizer:
        raise DataError("data.path and data.tokenizer must be set to read a stored dataset "
                         "(build one with tools/build_dataset.py)")
    vocab = Vocabulary.from_tokenizer_dir(data_cfg.tokenizer, text_size=model_cfg.text_vocab,
                                          num_image_codes=model_cfg.num_image_codes)
    packing = PackingSettings(data_cfg.seq_length, data_cfg.block_size, data_cfg.split_samples,
                              data_cfg.overlong, data_cfg.lookahead)
    return PackedBatchLoader.open(blend_from_path(data_cfg.path, stage), vocab, packing, data_cfg.seed,
                                  data_cfg.cache_dir, rows)
