"""Runners over the plain-PyTorch reference model (``convert/hf_reference.py``) on an HF folder.

:class:`CachedReferenceRunner` keeps, per layer, the rotated keys and the values of every
committed token: a refinement step runs the layers on the current block only (queries = the
block, keys = cache + block), and ``commit`` runs them once on the finished block and appends
its keys/values. :func:`uncached_reference_runner` recomputes everything every step.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_uni.convert.hf_reference import LLaDA2Reference, apply_partial_rope, rms_norm
from megatron_uni.inference.runner import UncachedRunner, block_causal_allowed


@dataclasses.dataclass
class KVCache:
    """Rotated keys and values ``[rows, kv_heads, T, head_dim]`` per attention layer."""

    block_size: int
    rows: int
    layers: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    valid: Optional[torch.Tensor] = None  # bool [rows, T]

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


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


class CachedReferenceRunner:
    """:class:`~megatron_uni.inference.runner.ModelRunner` with a prefix KV cache."""

    def __init__(self, weights, config, dtype: torch.dtype = torch.float32) -> None:
        self.model = _CachingReference(weights, config, dtype)
        self.vocab_size = int(self.model.w["lm_head.weight"].shape[0])
        self.max_length = int(self.model.c.get("max_position_embeddings", 1 << 30))
        self.forwards = 0

    def new_cache(self, rows: int, block_size: int) -> KVCache:
        return KVCache(block_size=block_size, rows=rows)

    def _run(self, cache: KVCache, tokens, positions, valid, write: bool) -> torch.Tensor:
        start = cache.length
        new_valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
        key_valid = new_valid if cache.valid is None else torch.cat([cache.valid, new_valid], dim=1)
        query_index = torch.arange(start, start + tokens.shape[1])
        allowed = block_causal_allowed(query_index, torch.arange(key_valid.shape[1]), cache.block_size, key_valid)
        self.model.cache, self.model.write = cache, write
        try:
            logits = self.model(tokens, positions, allowed)
        finally:
            self.model.cache, self.model.write = None, False
        if write:
            cache.valid = key_valid
        self.forwards += 1
        return logits

    def commit(self, cache: KVCache, tokens, positions, valid=None) -> None:
        self._run(cache, tokens, positions, valid, write=True)

    def forward(self, cache: KVCache, tokens, positions) -> torch.Tensor:
        return self._run(cache, tokens, positions, None, write=False)


def uncached_reference_runner(weights, config, dtype: torch.dtype = torch.float32) -> UncachedRunner:
    """The reference model recomputing the whole prefix every step (the cache's definition)."""
    model = LLaDA2Reference(weights, config, dtype)
    vocab = int(model.w["lm_head.weight"].shape[0])
    return UncachedRunner(lambda ids, pos, allowed: model(ids, pos, allowed), vocab,
                          int(model.c.get("max_position_embeddings", 1 << 30)))
