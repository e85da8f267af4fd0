"""Stored datasets -> blended, packed, sharded, resumable stream of :class:`Batch`.

    loader = PackedBatchLoader.open(blend, vocab, PackingSettings(seq_length, block_size),
                                    micro_batch_size=2, seed=1234, dp_rank=r, dp_world=w)
    batch = next(loader)                    # Batch, every tensor [micro_batch_size, seq_length]
    state = loader.state_dict()             # save with the checkpoint
    loader.load_state_dict(state)           # exact resume
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_uni.data.batch import BATCH_FIELDS, Batch
from megatron_uni.data.blend import BlendEntry, blended_documents, load_blend
from megatron_uni.data.packing import PackingSettings, PackingStats, materialize_row, plan_rows
from megatron_uni.data.sampler import ResumableSampler, RowPlan
from megatron_uni.data.storage import SampleDataset
from megatron_uni.tokens import Vocabulary


LAYOUT_KEYS = ("text_size", "num_image_codes", "special_ids")


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
            raise ValueError(f"dataset {prefix!r} was built with {key}={built[key]}, this run uses {mine[key]}: "
                             f"rebuild it with this tokenizer")


def collate(rows: Sequence[Dict[str, np.ndarray]]) -> Batch:
    return Batch(**{name: torch.from_numpy(np.stack([r[name] for r in rows])).to(dtype)
                    for name, dtype in BATCH_FIELDS.items()})


class PackedBatchLoader:
    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float], vocab: Vocabulary,
                 packing: PackingSettings, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_world: int = 1) -> None:
        self.datasets, self.vocab, self.packing = list(datasets), vocab, packing
        self._check_vocab()
        stats = PackingStats()
        documents = blended_documents([d.lengths for d in self.datasets], weights, seed)
        self.plan = RowPlan(plan_rows(documents, packing, stats), stats)
        self.sampler = ResumableSampler(micro_batch_size, seed, dp_rank, dp_world)

    @classmethod
    def open(cls, blend: Sequence[BlendEntry], vocab: Vocabulary, packing: PackingSettings,
             micro_batch_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1) -> "PackedBatchLoader":
        datasets = [SampleDataset(e.path) for e in blend]
        return cls(datasets, [e.weight for e in blend], vocab, packing, micro_batch_size, seed, dp_rank, dp_world)

    def _check_vocab(self) -> None:
        """Fail early (naming the dataset) when it was built with another vocabulary layout."""
        for data in self.datasets:
            if len(data) == 0:
                raise ValueError(f"dataset {data.prefix!r} is empty")
            check_built_vocabulary(data.prefix, self.vocab)
            # spot check for datasets without build.json: ids of the longest document must fit
            highest = int(data.get(int(np.argmax(data.lengths))).tokens.max())
            if highest >= self.vocab.size:
                raise ValueError(f"dataset {data.prefix!r} holds token id {highest} >= vocabulary size "
                                 f"{self.vocab.size}: built with another tokenizer?")

    def _fetch(self, ref, start: int, end: int):
        dataset, document = ref
        return self.datasets[dataset].get(document, offset=start, length=end - start)

    def row(self, index: int) -> Dict[str, np.ndarray]:
        return materialize_row(self.plan[index], self._fetch, self.packing, self.vocab.pad_id)

    def rows(self, indices: List[int]) -> Batch:
        return collate([self.row(i) for i in indices])

    def __iter__(self) -> "PackedBatchLoader":
        return self

    def __next__(self) -> Batch:
        return self.rows(self.sampler.next_rows())

    @property
    def stats(self) -> PackingStats:
        """Packing statistics of the rows planned so far (efficiency = non-pad fraction)."""
        return self.plan.stats

    def state_dict(self) -> Dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def blend_from_path(path: str, stage: Optional[str] = None) -> List[BlendEntry]:
    """A blend YAML file (``.yaml``/``.yml``) or a single dataset prefix (weight 1)."""
    if path.endswith((".yaml", ".yml")):
        return load_blend(path, stage)
    return [BlendEntry(path, 1.0)]


def open_training_data(data_cfg, model_cfg, dp_rank: int = 0, dp_world: int = 1,
                       stage: Optional[str] = None, split_samples: bool = False,
                       overlong: str = "drop", lookahead: int = 1) -> PackedBatchLoader:
    """Loader from the recipe's ``data`` section (path, tokenizer, seq_length, block_size,
    micro_batch_size, seed) and ``model`` section (text_vocab, num_image_codes)."""
    if not data_cfg.path or not data_cfg.tokenizer:
        raise ValueError("data.path and data.tokenizer must be set to read a stored dataset "
                         "(build one with tools/build_dataset.py)")
    vocab = Vocabulary.from_tokenizer_dir(data_cfg.tokenizer, text_size=model_cfg.text_vocab,
                                          num_image_codes=model_cfg.num_image_codes)
    packing = PackingSettings(data_cfg.seq_length, data_cfg.block_size, split_samples, overlong, lookahead)
    return PackedBatchLoader.open(blend_from_path(data_cfg.path, stage), vocab, packing,
                                  data_cfg.micro_batch_size, data_cfg.seed, dp_rank, dp_world)
