"""Micro-batches for the loop: stored data -> packed ``Batch`` -> BDLM ``DiffusionInputs``.

Stateless by design: the packed row sequence is a pure function of (datasets, weights, seed), so
micro-batch ``index`` of ``iteration`` on data-parallel rank ``dp_rank`` reads the rows
``data.sampler.microbatch_plan`` names, and each row's noise is keyed by (data.seed, global row)
(``diffusion.noising.RowKeys``). Every TP/PP rank of a replica thus builds the identical
micro-batch, a row gets the same noise at any DP / micro-batch size, and resuming needs nothing
but the iteration.

With ``data.num_workers > 0`` the micro-batches are built (fetch -> pack -> noise -> layout) in
worker processes: a torch ``DataLoader`` over :class:`StepMicrobatches`, a map-style dataset of
this DP rank's (iteration, k) from the first requested iteration on, each worker keeping
``data.prefetch`` micro-batches in flight, pinned when CUDA is available. The callable
interface is unchanged; a micro-batch is a pure function of its (iteration, k, dp_rank, dp_size)
and so identical whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

import torch
import torch.utils.data

from megatron_uni.config import Config
from megatron_uni.data.loader import open_training_data
from megatron_uni.data.sampler import microbatch_plan
from megatron_uni.diffusion.inputs import DiffusionInputs, build_inputs
from megatron_uni.diffusion.noising import RowKeys
from megatron_uni.tokens import Vocabulary


MicrobatchKey = Tuple[int, int, int, int]  # (iteration, k, dp_rank, dp_size)


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
        self._prefetcher: Optional[_Prefetcher] = None

    def __call__(self, iteration: int, index: int, dp_rank: int, dp_size: int) -> DiffusionInputs:
        if self.cfg.data.num_workers == 0:
            return self.build_microbatch(iteration, index, dp_rank, dp_size)
        key = (iteration, index, dp_rank, dp_size)
        if self._prefetcher is None or not self._prefetcher.serves(key):
            self.close()
            self._prefetcher = _Prefetcher(self, key)
        return self._prefetcher.get(key)

    def build_microbatch(self, iteration: int, index: int, dp_rank: int, dp_size: int) -> DiffusionInputs:
        """Synchronously, in this process."""
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
    def microbatches_per_step(self) -> int:
        return self.cfg.data.global_batch_size // self.cfg.data.micro_batch_size

    def close(self) -> None:
        """Stop the worker processes (they also stop when the source is garbage-collected)."""
        self._prefetcher = None

    def __getstate__(self):  # workers get the source without the prefetcher that started them
        return {**self.__dict__, "_prefetcher": None}

    @property
    def model_seq_length(self) -> int:
        """Sequence length the model sees: 2L for ``[noisy | clean]``, 3L for the shared-clean
        ``[noisy_a | noisy_b | clean]`` layout."""
        return self.cfg.diffusion.copies_per_row * self.cfg.data.seq_length


@dataclasses.dataclass
class _Built:
    """One micro-batch from a worker; ``pin_memory`` is what the DataLoader's pinning thread calls."""

    key: MicrobatchKey
    inputs: DiffusionInputs

    def pin_memory(self) -> "_Built":
        def pin(value):
            return value.pin_memory() if isinstance(value, torch.Tensor) else value
        inputs = self.inputs
        layout = dataclasses.replace(inputs.layout, **{f.name: pin(getattr(inputs.layout, f.name))
                                                       for f in dataclasses.fields(inputs.layout)})
        fields = {f.name: pin(getattr(inputs, f.name)) for f in dataclasses.fields(inputs) if f.name != "layout"}
        return _Built(self.key, dataclasses.replace(inputs, **fields, layout=layout))


class StepMicrobatches(torch.utils.data.Dataset):
    """Map-style: item i is micro-batch ``i % per_step`` of iteration ``first + i // per_step`` on one DP rank."""

    def __init__(self, source: MicrobatchSource, first_iteration: int, dp_rank: int, dp_size: int) -> None:
        self.source, self.first, self.dp_rank, self.dp_size = source, first_iteration, dp_rank, dp_size
        self.per_rank = source.microbatches_per_step // dp_size

    def __len__(self) -> int:
        return max(0, self.source.cfg.schedule.train_iters - self.first) * self.per_rank

    def __getitem__(self, item: int) -> _Built:
        iteration, index = divmod(item, self.per_rank)
        key = (self.first + iteration, index, self.dp_rank, self.dp_size)
        return _Built(key, self.source.build_microbatch(*key))


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # workers x intra-op threads would oversubscribe the host's cores


class _Prefetcher:
    """Workers building this rank's micro-batches ahead, in order, from one (iteration, k) on.

    Keeps the current iteration's micro-batches, since every virtual-pipeline chunk asks for the
    same ones; a request outside the stream (an earlier iteration, another rank) restarts it.
    """

    def __init__(self, source: MicrobatchSource, key: MicrobatchKey) -> None:
        iteration, _, dp_rank, dp_size = key
        d = source.cfg.data
        self.source, self.dp_rank, self.dp_size, self.first = source, dp_rank, dp_size, iteration
        loader = torch.utils.data.DataLoader(
            StepMicrobatches(source, iteration, dp_rank, dp_size), batch_size=None, shuffle=False,
            num_workers=d.num_workers, prefetch_factor=d.prefetch, pin_memory=torch.cuda.is_available(),
            worker_init_fn=_one_thread)
        self.stream = iter(loader)
        self.built: Dict[MicrobatchKey, DiffusionInputs] = {}
        self.newest: Optional[MicrobatchKey] = None

    def serves(self, key: MicrobatchKey) -> bool:
        iteration, _, dp_rank, dp_size = key
        behind = self.newest is not None and iteration < self.newest[0] and key not in self.built
        return (dp_rank, dp_size) == (self.dp_rank, self.dp_size) and iteration >= self.first and not behind

    def get(self, key: MicrobatchKey) -> DiffusionInputs:
        while key not in self.built:
            item = next(self.stream, None)
            if item is None:  # past data.train_iters (the stream's end): build it here
                return self.source.build_microbatch(*key)
            if self.newest is not None and item.key[0] > self.newest[0]:
                self.built = {k: v for k, v in self.built.items() if k[0] >= item.key[0]}
            self.newest = item.key
            self.built[item.key] = item.inputs
        return self.built[key]
