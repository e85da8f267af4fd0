"""Our megatron-core model (from a torch_dist checkpoint, one process) as an uncached runner.

Every refinement step runs committed prefix + current block through the model with the dense
block-causal mask (``model(ids, positions, mask)``, True = masked out, which the block-diffusion
core attention takes directly). A cached megatron path (keys/values of committed blocks kept
per layer) is not built: see docs/inference.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_uni.inference.runner import UncachedRunner


def model_config_from_checkpoint(path: str):
    """The ModelConfig a checkpoint was saved with (its metadata.json)."""
    from megatron_uni.checkpoint import read_metadata
    from megatron_uni.config import ModelConfig

    saved = read_metadata(path).get("model_config") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def load_megatron_model(path: str, model_cfg=None):
    """Build the model for one CPU process and load ``path`` (a checkpoint root or iter_* dir)."""
    from megatron.core import parallel_state

    from megatron_uni.checkpoint import load_checkpoint
    from megatron_uni.config import ParallelConfig
    from megatron_uni.model.block_attention import block_attention_spec
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import init_single_process

    model_cfg = model_cfg or model_config_from_checkpoint(path)
    if not parallel_state.model_parallel_is_initialized():
        init_single_process(ParallelConfig())
    model = build_model(model_cfg, ParallelConfig(), core_attention=block_attention_spec())
    load_checkpoint(path, [model], model_config=model_cfg)
    model.eval()
    return model, model_cfg


def megatron_runner(model, model_cfg) -> UncachedRunner:
    def logits(ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, positions, ~allowed)

    return UncachedRunner(logits, model_cfg.vocab, model_cfg.max_position_embeddings)


def megatron_runner_from_checkpoint(path: str, model_cfg: Optional[object] = None) -> UncachedRunner:
    return megatron_runner(*load_megatron_model(path, model_cfg))
