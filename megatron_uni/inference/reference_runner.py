"""Runners over the plain-PyTorch reference model (``convert/hf_reference.py``) on an HF folder.

:class:`CachedReferenceRunner` keeps, per layer, the rotated keys and the values of every
committed token: a refinement step runs the layers on the current block only (queries = the
block, keys = cache + block), and ``commit`` runs them once on the finished block and appends
its keys/values. :func:`uncached_reference_runner` recomputes everything every step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_uni.convert.hf_reference import LLaDA2Reference, apply_partial_rope, rms_norm
from megatron_uni.inference.runner import CachedRunner, KVCache, UncachedRunner


class _CachingReference(LLaDA2Reference):
    """The reference model whose attention reads (and on commit extends) a :class:`KVCache`."""

    cache: Optional[KVCache] = None
    write: bool = False

    def attention(self, x, prefix, cos, sin, allowed):
        b, s, _ = x.shape
        qkv = F.linear(x, self.w[f"{prefix}.query_key_value.weight"])
        qkv = qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = torch.split(qkv, [self.heads, self.kv_heads, self.kv_heads], dim=2)
        q = rms_norm(q, self.w[f"{prefix}.query_layernorm.weight"], self.eps)
        k = rms_norm(k, self.w[f"{prefix}.key_layernorm.weight"], self.eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if prefix in self.cache.layers:
            cached_k, cached_v = self.cache.layers[prefix]
            all_k, all_v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
        else:
            all_k, all_v = k, v
        if self.write:
            self.cache.layers[prefix] = (all_k, all_v)
        repeat = self.heads // self.kv_heads
        all_k, all_v = all_k.repeat_interleave(repeat, dim=1), all_v.repeat_interleave(repeat, dim=1)
        scores = (q @ all_k.transpose(-1, -2)) / (self.head_dim ** 0.5)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ all_v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return F.linear(out, self.w[f"{prefix}.dense.weight"])


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
