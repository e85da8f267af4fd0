"""The Ling / LLaDA2 expert router: group-limited top-k where a group scores the sum of its 2 best.

megatron-core 0.16.1 (``moe_utils.group_limited_topk``) scores an expert group by the sum of its
``topk // group_topk`` best scores; Ling-mini-2.0 / LLaDA2 (HF ``LLaDA2MoeGate``) always by its 2
best. The two agree only when ``topk // group_topk == 2`` (the 16B model: top-8 of 4 kept groups).
:class:`LingTopKRouter` is megatron's ``TopKRouter`` with the top-k computation swapped through the
slot megatron calls it through (``router_replay.get_replay_topk``); the sigmoid scores, expert
bias, normalisation, scaling and bias updates stay megatron's. When the ratio is 2 megatron's own
computation runs, so the 16B routing is bitwise what it was.

The router facts below are fixed by the architecture, not by a recipe: a sigmoid score per expert,
computed in fp32; an expert bias (aux-loss-free balancing, kept in fp32) added for *selection only*;
the chosen experts' unbiased scores normalised by their sum (megatron does this for sigmoid top-k > 1,
HF says ``norm_topk_prob``); no auxiliary balancing loss. Both megatron's ``TransformerConfig`` and the
exported HF ``config.json`` are derived from :data:`ROUTER`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_uni.config import ConfigError

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


def ling_group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int,
                            group_topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``topk`` experts of the ``group_topk`` groups with the best sum-of-2 scores.
    ``scores``: [tokens, experts]; returns (selected scores, expert indices), each [tokens, topk]."""
    tokens, experts = scores.shape
    group_scores = scores.view(tokens, num_groups, -1).topk(GROUP_SCORE_EXPERTS, dim=-1).values.sum(dim=-1)
    chosen_groups = group_scores.topk(group_topk, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(tokens, num_groups, experts // num_groups).reshape(tokens, -1)
    return scores.masked_fill(~expert_mask, float("-inf")).topk(topk, dim=-1)


class LingGroupScore:
    """Fills megatron's router-replay slot: ``get_replay_topk`` is how ``TopKRouter.routing`` asks
    for its top-k, with megatron's own computation passed as ``default_compute_topk``."""

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: Optional[int] = None,
                        group_topk: Optional[int] = None, default_compute_topk: Optional[Callable] = None):
        if not group_topk or topk // group_topk == GROUP_SCORE_EXPERTS:
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        return ling_group_limited_topk(scores, topk, num_groups, group_topk)


class LingTopKRouter(TopKRouter):
    """megatron's TopKRouter with the Ling group score (any ``topk / group_topk``)."""

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.router_replay is not None or config.moe_router_fusion:
            # both bypass or take the slot the group score lives in
            raise ConfigError("the Ling router cannot run with moe_enable_routing_replay or moe_router_fusion")
        groups = config.moe_router_num_groups
        if config.moe_router_group_topk and config.num_moe_experts // groups < GROUP_SCORE_EXPERTS:
            raise ConfigError(f"model.moe_router_num_groups={groups} leaves fewer than {GROUP_SCORE_EXPERTS} experts "
                              f"per group; the Ling group score sums the {GROUP_SCORE_EXPERTS} best of each")
        self.router_replay = LingGroupScore()
