"""ModelConfig + ParallelConfig -> megatron-core ``TransformerConfig`` for LLaDA2.0-Uni."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import ConfigError, ModelConfig, ParallelConfig
from megatron_uni.model.router_facts import ROUTER
from megatron_uni.platform.te import transformer_engine_available

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def use_transformer_engine(model: ModelConfig) -> bool:
    """TE layers when TE imports (``auto``), or as the recipe forces; same checkpoints either way."""
    if model.transformer_impl == "local":
        return False
    available = transformer_engine_available()
    if model.transformer_impl == "transformer_engine" and not available:
        raise ConfigError("model.transformer_impl=transformer_engine but transformer_engine does not import "
                          "here (install the [te] extra on a GPU machine)")
    return available


def _fp8_settings(model: ModelConfig, te: bool) -> dict:
    if model.fp8 is None:
        return {}
    if not te:
        raise ConfigError(f"model.fp8={model.fp8!r} needs TransformerEngine, which does not import here "
                          f"(install the [te] extra on a GPU machine, or set model.fp8=null)")
    return {"fp8": model.fp8, "fp8_recipe": model.fp8_recipe}


def _moe_settings(model: ModelConfig) -> dict:
    if not model.has_moe:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_layer_freq=model.moe_layer_pattern,
        moe_router_topk=model.moe_router_topk,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_grouped_gemm=model.moe_grouped_gemm,
        **ROUTER.megatron_kwargs(),
    )


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig,
                             initialize: bool = True) -> TransformerConfig:
    """``initialize=False``: weights are allocated, never drawn (megatron's ``perform_initialization``),
    for callers that overwrite every weight (the HF import); no full-size init buffer per weight."""
    te = use_transformer_engine(model)
    if model.moe_grouped_gemm and not te:
        raise ConfigError("model.moe_grouped_gemm=true needs TransformerEngine; set it false on CPU")
    dtype = _DTYPES[model.params_dtype]
    interleaved = parallel.virtual_pipeline is not None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=True,                       # per-head RMSNorm on q and k, before RoPE
        gated_linear_unit=True,                  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=initialize,
        **parallel.megatron_kwargs(),
        sequence_parallel=parallel.sequence_parallel,
        # Interleaved PP: batched p2p over gloo pairs activations with grads wrongly when prev and
        # next are the same peer (PP=2) -- right losses, wrong gradients. Megatron-LM's own default.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if model.recompute_granularity == "full" else None,
        recompute_num_layers=1 if model.recompute_granularity == "full" else None,
        recompute_modules=model.recompute_modules,
        # Our losses are sums divided by one global token count (diffusion/losses.py). Set here,
        # not after the build: the MoE router copies it at construction and scales its z-loss by
        # the local token count only when it is on (else the z-loss gradient is ~tokens x too small).
        calculate_per_token_loss=True,
        **_moe_settings(model),
        **_fp8_settings(model, te),
    )
