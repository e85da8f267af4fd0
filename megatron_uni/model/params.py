"""Parameter counts by arithmetic (no weights allocated), total and active per token.

Active = attention, dense FFN, per MoE layer the router + top-k routed experts + shared expert,
all norms, and both (untied) embedding matrices. The expert bias is a buffer, not a parameter.
"""

from __future__ import annotations

import dataclasses

from megatron_uni.config import ModelConfig


def _swiglu(hidden: int, ffn: int) -> int:
    return hidden * 2 * ffn + ffn * hidden  # fc1 = [gate; up], fc2


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int
    attention: int
    dense_mlp: int
    experts: int

    def describe(self) -> str:
        return f"{self.total / 1e9:.2f}B total / {self.active / 1e9:.2f}B active"


def count_parameters(m: ModelConfig) -> ParamCount:
    h = m.hidden_size
    q_width = m.num_attention_heads * m.kv_channels
    kv_width = m.num_query_groups * m.kv_channels
    attention = h * (q_width + 2 * kv_width) + q_width * h + 2 * m.kv_channels + h  # +qk norms, input norm
    dense_mlp = _swiglu(h, m.ffn_hidden_size) + h                                   # + pre-MLP norm
    expert = _swiglu(h, m.moe_ffn_hidden_size)
    shared = _swiglu(h, m.moe_shared_expert_intermediate_size) if m.moe_shared_expert_intermediate_size else 0
    router = m.num_experts * h
    moe_total = m.num_experts * expert + shared + router + h
    moe_active = m.moe_router_topk * expert + shared + router + h
    num_moe = sum(m.moe_layer_pattern) if m.has_moe else 0
    num_dense = m.num_layers - num_moe
    embedding = 2 * m.vocab * h                                                     # untied input + output
    common = m.num_layers * attention + num_dense * dense_mlp + h + embedding        # + final norm
    return ParamCount(
        total=common + num_moe * moe_total,
        active=common + num_moe * moe_active,
        embedding=embedding,
        attention=m.num_layers * attention,
        dense_mlp=num_dense * dense_mlp,
        experts=num_moe * m.num_experts * expert,
    )
