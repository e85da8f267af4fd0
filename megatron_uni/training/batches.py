"""Micro-batches for the loop: stored data -> packed ``Batch`` -> BDLM ``DiffusionInputs``.

Stateless by design: the packed row sequence is a pure function of (datasets, weights, seed), so
micro-batch ``index`` of ``iteration`` on data-parallel rank ``dp_rank`` reads the rows
``data.sampler.microbatch_plan`` names, and each row's noise is keyed by (data.seed, global row)
(``diffusion.noising.RowKeys``). Every TP/PP rank of a replica thus builds the identical
micro-batch, a row gets the same noise at any DP / micro-batch size, and resuming needs nothing
but the iteration.
"""

from __future__ import annotations

import os

from megatron_uni.config import Config
from megatron_uni.data.loader import open_training_data
from megatron_uni.data.sampler import microbatch_plan
from megatron_uni.diffusion.inputs import DiffusionInputs, build_inputs
from megatron_uni.diffusion.noising import RowKeys
from megatron_uni.tokens import Vocabulary


class MicrobatchSource:
    def __init__(self, cfg: Config) -> None:
        if cfg.data.path and not cfg.data.path.endswith((".yaml", ".yml")) \
                and not os.path.isfile(cfg.data.path + ".idx"):
            raise FileNotFoundError(f"data.path={cfg.data.path!r}: no {cfg.data.path}.idx (build it with "
                                    f"tools/build_dataset.py, or run `make demo-data`)")
        self.cfg = cfg
        # one loader over the whole row sequence; rows are addressed directly, never iterated
        self.loader = open_training_data(cfg.data, cfg.model, stage=cfg.data.stage,
                                         rows=cfg.schedule.train_iters * cfg.data.global_batch_size)
        self.vocab: Vocabulary = self.loader.vocab

    def __call__(self, iteration: int, index: int, dp_rank: int, dp_size: int) -> DiffusionInputs:
        d = self.cfg.data
        rows = microbatch_plan(iteration, index, dp_rank, dp_size, d.micro_batch_size, d.global_batch_size)
        return self.build(rows)

    def build(self, rows) -> DiffusionInputs:
        """The micro-batch of these global rows: fetch -> pack -> row-keyed noise -> layout."""
        d = self.cfg.data
        keys = RowKeys(seed=d.seed, rows=tuple(rows), global_batch_size=d.global_batch_size)
        return build_inputs(self.loader.rows(rows), self.vocab, self.cfg.diffusion, block_size=d.block_size,
                            keys=keys)

    @property
    def model_seq_length(self) -> int:
        """Sequence length the model sees: 2L for ``[noisy | clean]``, 3L for the shared-clean
        ``[noisy_a | noisy_b | clean]`` layout."""
        return (3 if self.cfg.diffusion.shared_clean else 2) * self.cfg.data.seq_length
