"""The Ling group score in our router (model/router.py) against the plain-PyTorch HF reference, at
a ``topk / group_topk`` ratio where megatron-core's own group score differs (issue 11, section 3)."""

from __future__ import annotations

import os

import pytest
import torch

from convert_helpers import REPO, batch
from megatron_uni.config import load_config
from megatron_uni.model.router import GROUP_SCORE_EXPERTS, LingGroupScore, ling_group_limited_topk

TINY = os.path.join(REPO, "recipes", "model", "tiny.yaml")


def _megatron_and_reference(tmp_path, overrides):
    from megatron_uni.convert.hf_config import uni_config
    from megatron_uni.convert.hf_io import HFCheckpoint
    from megatron_uni.convert.hf_reference import LLaDA2Reference
    from megatron_uni.convert.importer import fill_from_hf, local_targets
    from megatron_uni.convert.tiny_hf import write_tiny_hf
    from megatron_uni.model.builder import build_model_chunks

    cfg = load_config(TINY, overrides)
    weights = write_tiny_hf(str(tmp_path / "hf"), cfg.model, text_only=True, seed=3, shards=1)
    chunks = build_model_chunks(cfg.model, cfg.parallel)
    fill_from_hf(local_targets(chunks, cfg.model, cfg.model.text_vocab), HFCheckpoint(str(tmp_path / "hf")), cfg.model, 7, 0.02, False)
    model = chunks[0].eval()
    return model, LLaDA2Reference(weights, uni_config(cfg.model, None)), cfg.model


def _logit_error(model, reference, text_vocab):
    ids, positions, mask = batch(vocab=text_vocab)
    with torch.no_grad():
        megatron = model(ids, positions, mask)[..., :text_vocab]
        expected = reference(ids, positions, ~mask)
    return (megatron - expected).abs().max().item()


@pytest.mark.parametrize("overrides", [[], ["model.moe_router_topk=3", "model.moe_router_group_topk=3"]],
                         ids=["tiny_top2_of_2_groups", "top3_of_3_groups"])
def test_logits_match_the_hf_reference_at_ratios_other_than_2(single_process, tmp_path, overrides):
    model, reference, cfg = _megatron_and_reference(tmp_path, overrides)
    assert cfg.moe_router_topk // cfg.moe_router_group_topk != GROUP_SCORE_EXPERTS
    assert _logit_error(model, reference, cfg.text_vocab) <= 1e-5
    routers = [m for m in model.modules() if hasattr(m, "router_replay")]
    assert routers and all(isinstance(r.router_replay, LingGroupScore) for r in routers)
    for router in routers:  # megatron's own group score (top topk/group_topk) routes differently here
        router.router_replay = None
    assert _logit_error(model, reference, cfg.text_vocab) > 1e-3


def test_ratio_2_runs_megatrons_own_computation_and_agrees_with_ours():
    """The 16B (top-8 of 4 kept groups of 32 of 256 experts): megatron's code runs, bitwise as before."""
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    scores = torch.rand(64, 256, generator=torch.Generator().manual_seed(0))
    calls = []

    def megatron_topk(s, k, num_groups=None, group_topk=None):
        calls.append(k)
        return group_limited_topk(s, k, s.shape[0], s.shape[1], num_groups, group_topk)

    values, indices = LingGroupScore().get_replay_topk(scores, 8, 8, 4, megatron_topk)
    assert calls == [8]
    ours_values, ours_indices = ling_group_limited_topk(scores, 8, 8, 4)
    assert torch.equal(indices, ours_indices) and torch.equal(values, ours_values)
