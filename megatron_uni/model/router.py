"""The Ling / LLaDA2 expert router: group-limited top-k where a group scores the sum of its 2 best.

megatron-core 0.16.1 (``moe_utils.group_limited_topk``) scores an expert group by the sum of its
``topk // group_topk`` best scores; Ling-mini-2.0 / LLaDA2 (HF ``LLaDA2MoeGate``) always by its 2
best. The two agree only when ``topk // group_topk == 2`` (the 16B model: top-8 of 4 kept groups).
:class:`LingTopKRouter` is megatron's ``TopKRouter`` with the top-k computation swapped through the
slot megatron calls it through (``router_replay.get_replay_topk``); the sigmoid scores, expert
bias, normalisation, scaling and bias updates stay megatron's. When the ratio is 2 megatron's own
computation runs, so the 16B routing is bitwise what it was.

The other router facts (sigmoid, fp32, expert bias, normalised top-k) are stated in
:mod:`megatron_uni.model.router_facts`.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_uni.config import ConfigError
from megatron_uni.model.router_facts import GROUP_SCORE_EXPERTS


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
