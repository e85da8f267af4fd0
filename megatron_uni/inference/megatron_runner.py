"""Our megatron-core model (from a torch_dist checkpoint, one process) as a sampler runner.

Uncached: every refinement step runs committed prefix + current block through the model with
the dense block-causal mask (``model(ids, positions, mask)``, True = masked out).

Cached: the model is built with :class:`CachedBlockAttention`, the block-diffusion core
attention that, while a :class:`~megatron_uni.inference.runner.KVCache` is active, prepends the
cached keys/values of its layer to the current tokens' (megatron hands the core attention keys
already rotated by RoPE at the tokens' ``position_ids``) and, on commit, appends them. The same
model serves both paths: with no active cache the module is the plain block attention.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_uni.inference.runner import CachedRunner, KVCache, UncachedRunner
from megatron_uni.model.block_attention import BlockDiffusionAttention


@dataclasses.dataclass
class _ActiveCache:
    cache: Optional[KVCache] = None
    write: bool = False


_ACTIVE = _ActiveCache()  # set by CachedMegatronRunner around one model call


class CachedBlockAttention(BlockDiffusionAttention):
    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        cache = _ACTIVE.cache
        if cache is None:
            return super().forward(query, key, value, attention_mask, *args, **kwargs)
        if id(self) in cache.layers:  # megatron layout [s, b, kv_heads, d]: the sequence is dim 0
            cached_key, cached_value = cache.layers[id(self)]
            key, value = torch.cat([cached_key, key], dim=0), torch.cat([cached_value, value], dim=0)
        if _ACTIVE.write:
            cache.layers[id(self)] = (key, value)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


def cached_attention_spec():
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=CachedBlockAttention)


def model_config_from_checkpoint(path: str):
    """The ModelConfig a checkpoint was saved with (its metadata.json)."""
    from megatron_uni.checkpoint import read_metadata

    return read_metadata(path).model_config


def load_megatron_model(path: str, model_cfg=None):
    """Build the model for one CPU process and load ``path`` (a checkpoint root or iter_* dir)."""
    from megatron.core import parallel_state

    from megatron_uni.checkpoint import load_checkpoint
    from megatron_uni.config import ParallelConfig
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import init_single_process

    model_cfg = model_cfg or model_config_from_checkpoint(path)
    if not parallel_state.model_parallel_is_initialized():
        init_single_process(ParallelConfig())
    model = build_model(model_cfg, ParallelConfig(), core_attention=cached_attention_spec())
    load_checkpoint(path, [model], model_config=model_cfg)
    model.eval()
    return model, model_cfg


class CachedMegatronRunner(CachedRunner):
    def __init__(self, model, model_cfg) -> None:
        super().__init__()
        self.model = model
        self.vocab_size, self.max_length = model_cfg.vocab, model_cfg.max_position_embeddings

    def _call_model(self, tokens, positions, allowed, cache, write):
        _ACTIVE.cache, _ACTIVE.write = cache, write
        try:
            with torch.no_grad():
                return self.model(tokens, positions, ~allowed)
        finally:
            _ACTIVE.cache, _ACTIVE.write = None, False


def megatron_runner(model, model_cfg, cached: bool = True):
    if cached:
        return CachedMegatronRunner(model, model_cfg)

    def logits(ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, positions, ~allowed)

    return UncachedRunner(logits, model_cfg.vocab, model_cfg.max_position_embeddings)


def megatron_runner_from_checkpoint(path: str, model_cfg=None, cached: bool = True):
    return megatron_runner(*load_megatron_model(path, model_cfg), cached=cached)
