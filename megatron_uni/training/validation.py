"""Validation: the masked-token CE on held-out data, per modality, with fixed noise.

Every ``eval.interval`` iterations the loop calls :class:`Validation`: ``eval.iters`` global
batches of the held-out dataset ``eval.path`` (packed like ``data.*``) go forward only, with the
same noise every time (generator seeded by ``eval.seed``, the batch and micro-batch index and the
DP rank -- never the iteration), so successive evaluations differ only through the weights. The
targets are weighted ``mean`` whatever ``diffusion.weighting`` is, so the numbers are plain
masked-token cross-entropies, comparable across runs and weightings:

``valid/masked_ce`` (all masked targets), ``valid/text_ce``, ``valid/image_ce``,
``valid/special_ce`` (block-padding / structural tokens) and ``valid/masked_tokens``.

The evaluation changes no training state: the model runs in eval mode under ``no_grad`` (no
dropout, no embedding noise, no expert-count accumulation) and the RNG state is restored.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_uni import platform
from megatron_uni.config import Config
from megatron_uni.data.loader import open_training_data
from megatron_uni.data.sampler import microbatch_rows
from megatron_uni.diffusion.inputs import DiffusionInputs, build_inputs
from megatron_uni.diffusion.losses import reduce_sums
from megatron_uni.training.loop import TrainState, _reports_contribute, num_microbatches
from megatron_uni.training.metrics import global_token_stats
from megatron_uni.training.step import make_forward_step

_SEED_STRIDE = 1 << 20  # keeps (seed, batch, micro-batch, dp rank) apart in one generator seed


class Validation:
    """The held-out micro-batches (fixed noise) and :meth:`__call__` giving the ``valid/*`` metrics."""

    def __init__(self, cfg: Config, seq_length: int) -> None:
        self.cfg = cfg
        self.seq_length = seq_length
        self.diffusion = dataclasses.replace(cfg.diffusion, weighting="mean")
        data = dataclasses.replace(cfg.data, path=cfg.eval.path)
        self.loader = open_training_data(data, cfg.model, stage=cfg.data.stage,
                                         rows=cfg.eval.iters * cfg.data.global_batch_size)

    def microbatch(self, batch: int, index: int, dp_rank: int, dp_size: int) -> DiffusionInputs:
        d = self.cfg.data
        rows = self.loader.rows(microbatch_rows(batch, index, dp_rank, dp_size, d.micro_batch_size,
                                                d.global_batch_size))
        seed = ((self.cfg.eval.seed * _SEED_STRIDE + batch) * _SEED_STRIDE + index) * _SEED_STRIDE + dp_rank
        generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        return build_inputs(rows, self.loader.vocab, self.diffusion, generator, block_size=d.block_size)

    def _iterators(self, state: TrainState, batch: int) -> List[Iterator]:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()

        def iterator():
            for index in range(num_microbatches(self.cfg)):
                yield self.microbatch(batch, index, dp_rank, dp_size)

        return [iterator() for _ in state.model]

    def _reports(self, state: TrainState) -> List[Dict]:
        forward_backward = get_forward_backward_func()
        reports = []
        for batch in range(self.cfg.eval.iters):
            iterators = self._iterators(state, batch)
            reports += forward_backward(
                forward_step_func=make_forward_step("mean"),
                data_iterator=iterators if len(iterators) > 1 else iterators[0], model=state.model,
                num_microbatches=num_microbatches(self.cfg), seq_length=self.seq_length,
                micro_batch_size=self.cfg.data.micro_batch_size * self.diffusion.rows_per_sample, forward_only=True)
        return reports

    def __call__(self, state: TrainState) -> Dict[str, float]:
        device = platform.device()
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        modes = [chunk.training for chunk in state.model]
        for chunk in state.model:
            chunk.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                reports = self._reports(state)
        finally:
            for chunk, mode in zip(state.model, modes):
                chunk.train(mode)
        contributes = _reports_contribute()
        sums = reduce_sums([report["diffusion"] for report in reports], contributes=contributes)
        tokens = global_token_stats(reports, contributes)

        def ratio(num: torch.Tensor, den: torch.Tensor) -> float:
            return float(num / den) if float(den) > 0 else float("nan")

        return {"valid/masked_ce": tokens["masked_ce"], "valid/text_ce": ratio(sums.text_loss, sums.text_weight),
                "valid/image_ce": ratio(sums.image_loss, sums.image_weight),
                "valid/special_ce": tokens["special_loss"], "valid/masked_tokens": tokens["masked_tokens"]}

