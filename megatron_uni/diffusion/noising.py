"""Forward (masking) process of masked diffusion: which maskable tokens become the mask token.

t is the mask ratio: each maskable token is replaced by the vocabulary's mask id with
probability t. t is drawn per DOCUMENT of a packed row (dFactory draws one t per conversation;
three documents packed in one row get three ratios) or per block (``per_block``, bd3lms) from
U[t_min, t_max] (the "mask-ratio bandwidth"). ``antithetic`` stratifies t: each row gets one
stratum of the global batch and its documents (blocks) are spread evenly from there, so the
ratios of a global batch cover the band evenly. Complementary masking doubles the rows: each
sample is followed by a copy whose mask is the complement over its maskable positions (ratio
1 - t), so each maskable token is supervised exactly once per pair; t is then drawn from the
band's symmetric part ``[max(t_min, 1 - t_max), min(t_max, 1 - t_min)]`` so both ratios stay in
``[t_min, t_max]`` (config validation requires the band to contain 0.5).

Seeding. In training every draw of a row comes from ``row_rng(seed, global_row)``, a numpy
generator keyed by the row's position in the run (:class:`RowKeys`), and the strata from a
permutation keyed by (seed, iteration): a row's noise is the same at any data-parallel size,
micro-batch size or worker count. Tests and tools may pass a torch ``generator`` instead (strata
then span the micro-batch). The settings are the recipe's ``diffusion:`` section
(``config.DiffusionConfig``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import numpy as np
import torch

from megatron_uni.config import DiffusionConfig
from megatron_uni.data.batch import Batch
from megatron_uni.rounding import ceil_div
from megatron_uni.tokens import Vocabulary

# smallest ratio used as the ELBO denominator: the complement of t = 1 is 0
MIN_RATIO = 1e-3
# second word of the strata key, so it never collides with a row key [seed, global_row]
_STRATA_TAG = 0x5354524154


@dataclasses.dataclass
class NoisedBatch:
    """The clean batch (possibly doubled by complementary masking) plus its noise."""

    batch: Batch
    noisy_tokens: torch.Tensor  # [b, L] int64
    masked: torch.Tensor        # [b, L] bool, subset of batch.maskable
    ratio: torch.Tensor         # [b, L] float, the t each position was masked with


@dataclasses.dataclass(frozen=True)
class RowKeys:
    """Where a micro-batch's rows sit in the run; their noise is a function of this alone."""

    seed: int
    rows: Tuple[int, ...]      # global row indices (``data.sampler.microbatch_plan``)
    global_batch_size: int     # rows per iteration: row r is position r % gbs of iteration r // gbs


def row_rng(seed: int, global_row: int) -> np.random.Generator:
    """The generator of every noise draw of one row: keyed by its global position only."""
    return np.random.default_rng(np.random.SeedSequence([seed, global_row]))


@functools.lru_cache(maxsize=4)
def _strata(seed: int, iteration: int, global_batch_size: int) -> np.ndarray:
    """Stratum of each row position of an iteration (a permutation, the same on every rank)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STRATA_TAG, iteration]))
    return rng.permutation(global_batch_size)


def ratio_band(cfg: DiffusionConfig) -> Tuple[float, float]:
    """The band t is drawn from: with complementary masking, its symmetric part (1 - t stays in it)."""
    if not cfg.complementary:
        return cfg.t_min, cfg.t_max
    return max(cfg.t_min, 1.0 - cfg.t_max), min(cfg.t_max, 1.0 - cfg.t_min)


def _units(doc_ids: torch.Tensor, block_size: int, per_block: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit (document, or block) of each position ``[b, L]`` and the number of units per row ``[b]``."""
    b, length = doc_ids.shape
    if per_block:
        unit = (torch.arange(length, device=doc_ids.device) // block_size).expand(b, length)
        return unit, torch.full((b,), ceil_div(length, block_size), device=doc_ids.device)
    unit = doc_ids.long().clamp_min(0)  # padding (-1) is never maskable; any ratio does
    return unit, unit.amax(1) + 1


def _keyed_draws(keys: RowKeys, num_units: torch.Tensor, length: int, antithetic: bool):
    """Row-keyed draws: stratum offset ``[b]``, unit draws ``[b, K]``, token draws ``[b, L]``."""
    if len(keys.rows) != num_units.shape[0]:
        raise ValueError(f"RowKeys names {len(keys.rows)} rows, the batch has {num_units.shape[0]}")
    width = int(num_units.max())
    row_u = np.empty(len(keys.rows))
    unit_u = np.zeros((len(keys.rows), width), dtype=np.float32)
    draw = np.empty((len(keys.rows), length), dtype=np.float32)
    for i, row in enumerate(keys.rows):
        rng = row_rng(keys.seed, row)
        draw[i] = rng.random(length, dtype=np.float32)
        offset = rng.random()
        n = int(num_units[i])
        unit_u[i, :n] = rng.random(n, dtype=np.float32)
        if antithetic:
            iteration, position = divmod(row, keys.global_batch_size)
            offset = (_strata(keys.seed, iteration, keys.global_batch_size)[position] + offset) \
                / keys.global_batch_size
        row_u[i] = offset
    return torch.from_numpy(row_u), torch.from_numpy(unit_u), torch.from_numpy(draw)


def _generator_draws(num_units: torch.Tensor, length: int, antithetic: bool,
                     generator: Optional[torch.Generator], device):
    """The same draws from one torch generator; strata span this micro-batch only."""
    b = num_units.shape[0]
    row_u = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
    if antithetic:
        row_u = ((torch.arange(b, device=device) + row_u) / b)[torch.randperm(b, generator=generator, device=device)]
    unit_u = torch.rand(b, int(num_units.max()), generator=generator, device=device)
    draw = torch.rand(b, length, generator=generator, device=device)
    return row_u, unit_u, draw


def _ratio(unit: torch.Tensor, num_units: torch.Tensor, row_u: torch.Tensor, unit_u: torch.Tensor,
           cfg: DiffusionConfig) -> torch.Tensor:
    """t per position: antithetic units sit at row_u + j / n (mod 1), one per stratum of the row."""
    if cfg.antithetic:
        j = torch.arange(unit_u.shape[1], device=unit.device, dtype=torch.float64)
        u = torch.remainder(row_u.to(unit.device)[:, None] + j[None] / num_units[:, None].double(), 1.0).float()
    else:
        u = unit_u.to(unit.device)
    lo, hi = ratio_band(cfg)
    return lo + (hi - lo) * u.gather(1, unit)


def sample_ratio(doc_ids: torch.Tensor, block_size: int, cfg: DiffusionConfig,
                 generator: Optional[torch.Generator] = None, keys: Optional[RowKeys] = None) -> torch.Tensor:
    """Mask ratio t per position ``[b, L]``: constant per document, or per block when ``cfg.per_block``."""
    return _noise_draws(doc_ids, block_size, cfg, generator, keys)[0]


def _noise_draws(doc_ids, block_size, cfg, generator, keys):
    """(ratio ``[b, L]``, token draws ``[b, L]``) from the row keys, else from ``generator``."""
    b, length = doc_ids.shape
    unit, num_units = _units(doc_ids, block_size, cfg.per_block)
    if keys is not None:
        row_u, unit_u, draw = _keyed_draws(keys, num_units.cpu(), length, cfg.antithetic)
    else:
        row_u, unit_u, draw = _generator_draws(num_units, length, cfg.antithetic, generator, doc_ids.device)
    return _ratio(unit, num_units, row_u, unit_u, cfg), draw.to(doc_ids.device)


def repeat_batch(batch: Batch, repeats: int) -> Batch:
    """Each sample repeated ``repeats`` times consecutively (sample i -> rows i*r .. i*r+r-1)."""
    return Batch(**{name: value.repeat_interleave(repeats, dim=0) for name, value in batch.as_dict().items()})


def noise_batch(batch: Batch, vocab: Vocabulary, cfg: DiffusionConfig, block_size: int,
                generator: Optional[torch.Generator] = None, keys: Optional[RowKeys] = None) -> NoisedBatch:
    """Mask the maskable tokens of ``batch``; with ``cfg.complementary`` return 2b rows (pairs).

    ``keys`` (training) seeds each row by its global position; without, ``generator`` is used.
    """
    b, length = batch.tokens.shape
    ratio, draw = _noise_draws(batch.doc_ids, block_size, cfg, generator, keys)
    masked = batch.maskable & (draw < ratio)
    if cfg.complementary:
        batch = repeat_batch(batch, 2)
        complement = batch.maskable[1::2] & ~masked
        masked = torch.stack([masked, complement], 1).view(2 * b, length)
        ratio = torch.stack([ratio, (1.0 - ratio).clamp_min(MIN_RATIO)], 1).view(2 * b, length)
    noisy = torch.where(masked, torch.full_like(batch.tokens, vocab.mask_id), batch.tokens)
    return NoisedBatch(batch=batch, noisy_tokens=noisy, masked=masked, ratio=ratio)
