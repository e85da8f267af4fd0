"""The LLaDA2.0-Uni layer spec: megatron-core's GPT decoder spec, made bidirectional.

We take megatron-core's own block spec (TE or local layers) and change only what differs:
self-attention gets ``AttnMaskType.arbitrary`` (the block-diffusion mask is always passed
explicitly; no causal default), the core attention can be swapped for another module (the
block-diffusion attention) and the ``SequentialMLP`` experts for a subclass of it (the
grouped-GEMM experts, ``experts.py``). Which layers are dense and which MoE is
``ModelConfig.moe_layer_pattern``, passed as ``moe_layer_freq``, which megatron's spec honours.
"""

from __future__ import annotations

import copy
from typing import Optional, Union

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import ConfigError, ModelConfig
from megatron_uni.model.router import LingTopKRouter


def decoder_block_spec(config: TransformerConfig, use_te: bool, vp_stage: Optional[int] = None,
                       core_attention: Optional[Union[ModuleSpec, type]] = None,
                       experts: Optional[type] = None) -> TransformerBlockSubmodules:
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    # megatron's specs share one ModuleSpec object between layers; copy before editing.
    block.layer_specs = [_moe(_same_keys_as_te(_bidirectional(copy.deepcopy(spec), core_attention)), experts)
                         for spec in block.layer_specs]
    return block


def core_attention_spec(model: ModelConfig) -> ModuleSpec:
    """The block-diffusion core attention of ``model.attention_backend``; both take the layout
    descriptor as ``attention_mask`` and hold no weights (same checkpoints)."""
    if model.attention_backend == "te_fused":
        from megatron_uni.model.te_attention import te_fused_block_attention
        from megatron_uni.platform.te import transformer_engine_available

        if not transformer_engine_available():
            raise ConfigError("model.attention_backend=te_fused needs TransformerEngine, which does not import "
                              "here (install the [te] extra on a GPU machine, or set model.attention_backend=flex)")
        return ModuleSpec(module=te_fused_block_attention())
    from megatron_uni.model.block_attention import block_attention_spec

    return block_attention_spec()


def _same_keys_as_te(layer: ModuleSpec) -> ModuleSpec:
    """Checkpoint keys independent of TE: the TE spec cannot fuse the pre-MLP norm into an MoE
    layer and saves it as ``pre_mlp_layernorm.weight``, while megatron's local spec renames it
    to ``mlp.linear_fc1.layer_norm_weight`` for every layer. Keep the rename for dense layers
    only (where TE fuses it too), so CPU-saved checkpoints load into TE models and back."""
    keys_map = dict(layer.submodules.sharded_state_dict_keys_map or {})
    if layer.submodules.mlp.module is MoELayer and "pre_mlp_layernorm." in keys_map:
        del keys_map["pre_mlp_layernorm."]
        layer.submodules.sharded_state_dict_keys_map = keys_map
    return layer


def _bidirectional(layer: ModuleSpec, core_attention) -> ModuleSpec:
    attention = layer.submodules.self_attention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    if core_attention is not None:
        attention.submodules.core_attention = core_attention
    return layer


def _moe(layer: ModuleSpec, experts: Optional[type]) -> ModuleSpec:
    """MoE layers route with the Ling group score (model/router.py), not megatron's, and run
    ``experts`` instead of ``SequentialMLP`` when given (a subclass: same parameters, same
    checkpoint keys). TE's grouped experts (``moe_grouped_gemm``) are left alone; config forbids
    selecting both."""
    mlp = layer.submodules.mlp
    if mlp.module is not MoELayer:
        return layer
    mlp.submodules.router = LingTopKRouter
    if experts is not None and mlp.submodules.experts.module is SequentialMLP:
        if not issubclass(experts, SequentialMLP):
            raise TypeError(f"experts module {experts.__name__} must subclass SequentialMLP (same checkpoint keys)")
        mlp.submodules.experts.module = experts
    return layer
