"""Forward (masking) process of masked diffusion: which maskable tokens become the mask token.

t is the mask ratio: each maskable token is replaced by the vocabulary's mask id with
probability t. t is drawn per sample (dFactory) or per block (bd3lms) from U[t_min, t_max]
(the "mask-ratio bandwidth"), optionally antithetic (stratified across the batch, lower
variance). Complementary masking doubles the batch: each sample is followed by a copy whose
mask is the complement over its maskable positions, so each maskable token is supervised
exactly once per pair. The settings are the recipe's ``diffusion:`` section (``config.DiffusionConfig``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_uni.config import DiffusionConfig
from megatron_uni.data.batch import Batch
from megatron_uni.rounding import ceil_div
from megatron_uni.tokens import Vocabulary

# smallest ratio used as the ELBO denominator: the complement of t = 1 is 0
MIN_RATIO = 1e-3


@dataclasses.dataclass
class NoisedBatch:
    """The clean batch (possibly doubled by complementary masking) plus its noise."""

    batch: Batch
    noisy_tokens: torch.Tensor  # [b, L] int64
    masked: torch.Tensor        # [b, L] bool, subset of batch.maskable
    ratio: torch.Tensor         # [b, L] float, the t each position was masked with


def _uniform(n: int, antithetic: bool, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """n draws in [0, 1); antithetic = one draw per stratum [i/n, (i+1)/n), shuffled."""
    u = torch.rand(n, generator=generator, device=device)
    if not antithetic:
        return u
    strata = (torch.arange(n, device=device) + u) / n
    return strata[torch.randperm(n, generator=generator, device=device)]


def sample_ratio(batch_size: int, seq_length: int, block_size: int, cfg: DiffusionConfig,
                 generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Mask ratio t per position ``[b, L]``: constant per sample, or per block when ``cfg.per_block``."""
    num_blocks = ceil_div(seq_length, block_size) if cfg.per_block else 1
    u = _uniform(batch_size * num_blocks, cfg.antithetic, generator, device).view(batch_size, num_blocks)
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * u
    if not cfg.per_block:
        return t.expand(batch_size, seq_length).clone()
    return t.repeat_interleave(block_size, dim=1)[:, :seq_length].contiguous()


def repeat_batch(batch: Batch, repeats: int) -> Batch:
    """Each sample repeated ``repeats`` times consecutively (sample i -> rows i*r .. i*r+r-1)."""
    return Batch(**{name: value.repeat_interleave(repeats, dim=0) for name, value in batch.as_dict().items()})


def noise_batch(batch: Batch, vocab: Vocabulary, cfg: DiffusionConfig, block_size: int,
                generator: Optional[torch.Generator] = None) -> NoisedBatch:
    """Mask the maskable tokens of ``batch``; with ``cfg.complementary`` return 2b rows (pairs)."""
    b, length = batch.tokens.shape
    device = batch.tokens.device
    ratio = sample_ratio(b, length, block_size, cfg, generator, device)
    draw = torch.rand(b, length, generator=generator, device=device)
    masked = batch.maskable & (draw < ratio)
    if cfg.complementary:
        batch = repeat_batch(batch, 2)
        complement = batch.maskable[1::2] & ~masked
        masked = torch.stack([masked, complement], 1).view(2 * b, length)
        ratio = torch.stack([ratio, (1.0 - ratio).clamp_min(MIN_RATIO)], 1).view(2 * b, length)
    noisy = torch.where(masked, torch.full_like(batch.tokens, vocab.mask_id), batch.tokens)
    return NoisedBatch(batch=batch, noisy_tokens=noisy, masked=masked, ratio=ratio)
