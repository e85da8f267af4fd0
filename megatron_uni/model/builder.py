"""Build the LLaDA2.0-Uni backbone: a :class:`~megatron_uni.model.gpt.UniGPTModel` (megatron-core's
``GPTModel`` with RoPE from ``position_ids``) from our layer spec."""

from __future__ import annotations

from typing import List, Optional

from megatron.core import parallel_state

from megatron_uni.config import ModelConfig, ParallelConfig
from megatron_uni.model.experts import expert_module
from megatron_uni.model.gpt import UniGPTModel
from megatron_uni.model.spec import decoder_block_spec
from megatron_uni.model.transformer_config import build_transformer_config, use_transformer_engine


def build_model(model_cfg: ModelConfig, parallel: Optional[ParallelConfig] = None,
                vp_stage: Optional[int] = None, core_attention=None, initialize: bool = True) -> UniGPTModel:
    """One model chunk for this rank (pipeline stage / virtual stage ``vp_stage``).

    Forward: ``model(input_ids, position_ids, attention_mask)`` with a bool ``[b,1,s,s]`` mask
    (True = masked out) gives logits ``[b, s, vocab]``; with ``labels=`` it gives per-token
    vocab-parallel cross-entropy ``[b, s]``. ``initialize=False`` leaves the weights uninitialised
    (allocated only), for a caller that fills every one of them and saves (the HF import). Not for
    training: megatron then also skips tagging TP-split weights (``tensor_model_parallel``), which
    grad-norm clipping reads; the sharded state dict, and so the checkpoint, is the same.
    """
    parallel = parallel or ParallelConfig()
    config = build_transformer_config(model_cfg, parallel, initialize)
    spec = decoder_block_spec(config, use_transformer_engine(model_cfg), vp_stage, core_attention,
                              experts=expert_module(model_cfg.expert_impl))
    return UniGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_cfg.vocab,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=model_cfg.rotary_percent,
        rotary_base=model_cfg.rotary_base,
        vp_stage=vp_stage,
    )


def build_model_chunks(model_cfg: ModelConfig, parallel: ParallelConfig, core_attention=None,
                       initialize: bool = True) -> List[UniGPTModel]:
    """All chunks of this rank: one, or ``virtual_pipeline`` of them for interleaved PP."""
    stages = [None] if parallel.virtual_pipeline is None else range(parallel.virtual_pipeline)
    return [build_model(model_cfg, parallel, vp, core_attention, initialize) for vp in stages]
