"""Runners over the plain-PyTorch reference model (``convert/hf_reference.py``) on an HF folder.

:class:`CachedReferenceRunner` keeps, per layer, the rotated keys and the values of every
committed token: a refinement step runs the layers on the current block only (queries = the
block, keys = cache + block), and ``commit`` runs them once on the finished block and appends
its keys/values. :func:`uncached_reference_runner` recomputes everything every step.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_uni.convert.hf_reference import LLaDA2Reference
from megatron_uni.inference.runner import CachedRunner, KVCache, UncachedRunner


class _CachingReference(LLaDA2Reference):
    """The reference model whose attention reads (and on commit extends) a :class:`KVCache`."""

    cache: Optional[KVCache] = None
    write: bool = False

    def keys_values(self, prefix, k, v):
        if prefix in self.cache.layers:
            cached_k, cached_v = self.cache.layers[prefix]
            k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
        if self.write:
            self.cache.layers[prefix] = (k, v)
        return k, v


class CachedReferenceRunner(CachedRunner):
    """:class:`~megatron_uni.inference.runner.ModelRunner` with a prefix KV cache."""

    def __init__(self, weights, config, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = _CachingReference(weights, config, dtype)
        self.vocab_size = int(self.model.w["lm_head.weight"].shape[0])
        self.max_length = int(self.model.c.get("max_position_embeddings", 1 << 30))

    def _call_model(self, tokens, positions, allowed, cache, write):
        self.model.cache, self.model.write = cache, write
        try:
            return self.model(tokens, positions, allowed)
        finally:
            self.model.cache, self.model.write = None, False


def uncached_reference_runner(weights, config, dtype: torch.dtype = torch.float32) -> UncachedRunner:
    """The reference model recomputing the whole prefix every step (the cache's definition)."""
    model = LLaDA2Reference(weights, config, dtype)
    vocab = int(model.w["lm_head.weight"].shape[0])
    return UncachedRunner(lambda ids, pos, allowed: model(ids, pos, allowed), vocab,
                          int(model.c.get("max_position_embeddings", 1 << 30)))
