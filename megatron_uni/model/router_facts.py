"""The router facts of LLaDA2.0-Uni's MoE layers, stated once (no megatron import: the HF config
code and the CLIs read them without loading megatron-core).

Fixed by the architecture, not by a recipe: a sigmoid score per expert, computed in fp32; an
expert bias (aux-loss-free balancing, kept in fp32) added for *selection only*; the chosen
experts' unbiased scores normalised by their sum (megatron does this for sigmoid top-k > 1,
HF says ``norm_topk_prob``); no auxiliary balancing loss. Both megatron's ``TransformerConfig``
and the exported HF ``config.json`` are derived from :data:`ROUTER`; the group score that
megatron-core gets wrong for some ratios is :mod:`megatron_uni.model.router`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

GROUP_SCORE_EXPERTS = 2  # LLaDA2MoeGate: group score = sum of the 2 best (biased) scores in the group


@dataclasses.dataclass(frozen=True)
class RouterFacts:
    score_function: str = "sigmoid"
    dtype: str = "fp32"
    expert_bias: bool = True
    normalise_top_k: bool = True
    load_balancing: str = "none"        # no auxiliary loss; the expert bias balances

    def megatron_kwargs(self) -> Dict[str, Any]:
        """``TransformerConfig`` arguments (megatron normalises sigmoid top-k on its own)."""
        return dict(moe_router_score_function=self.score_function, moe_router_dtype=self.dtype,
                    moe_router_enable_expert_bias=self.expert_bias,
                    moe_router_load_balancing_type=self.load_balancing, moe_aux_loss_coeff=0.0)

    def hf_config(self) -> Dict[str, Any]:
        """Keys of HF ``config.json`` whose defaults in the remote config class differ (sglang-omni
        reads ``moe_router_enable_expert_bias`` with default False)."""
        return {"score_function": self.score_function, "router_dtype": self.dtype,
                "moe_router_enable_expert_bias": self.expert_bias, "norm_topk_prob": self.normalise_top_k}


ROUTER = RouterFacts()
