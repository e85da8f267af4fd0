"""Parameter counts by arithmetic: the published 16B numbers, and equality with ``sum(p.numel())``
of built tiny models (with and without a shared expert, different numbers of dense layers)."""

import os

import pytest

from megatron_uni.config import load_config
from megatron_uni.model.params import count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = os.path.join(REPO, "recipes", "model", "llada2_uni_16b.yaml")
TINY = os.path.join(REPO, "recipes", "model", "tiny.yaml")


def test_16b_uni_recipe_is_16_32b_total_1_50b_active():
    counts = count_parameters(load_config(BIG).model)
    assert counts.total / 1e9 == pytest.approx(16.32, abs=0.01)
    assert counts.active / 1e9 == pytest.approx(1.50, abs=0.01)
    assert counts.describe() == "16.32B total / 1.50B active"


def test_text_only_vocab_gives_ling_mini_2_published_counts():
    counts = count_parameters(load_config(BIG, ["model.num_image_codes=0"]).model)
    assert counts.total / 1e9 == pytest.approx(16.26, abs=0.01)
    assert counts.active / 1e9 == pytest.approx(1.43, abs=0.01)


def test_image_codes_add_two_embedding_matrices_of_rows():
    uni = count_parameters(load_config(BIG).model)
    text = count_parameters(load_config(BIG, ["model.num_image_codes=0"]).model)
    assert uni.total - text.total == uni.active - text.active == 2 * 16384 * 2048


TINY_VARIANTS = {
    "recipe": [],
    "no_shared_expert": ["model.moe_shared_expert_intermediate_size=null"],
    "two_dense_layers": ["model.first_k_dense=2", "model.num_experts=4", "model.moe_router_num_groups=2",
                         "model.moe_router_group_topk=1"],
    "all_dense": ["model.first_k_dense=4"],
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_arithmetic_equals_the_built_model(single_process, variant):
    from megatron_uni.model.builder import build_model

    model_cfg = load_config(TINY, TINY_VARIANTS[variant]).model
    model = build_model(model_cfg)
    built = sum(p.numel() for p in model.parameters())
    counts = count_parameters(model_cfg)
    assert counts.total == built
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.experts == experts
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_experts." in n)
    assert (shared > 0) == (variant in ("recipe", "two_dense_layers"))
    if model_cfg.first_k_dense < model_cfg.num_layers:
        # active = total minus the experts a token does not visit
        unvisited = experts * (model_cfg.num_experts - model_cfg.moe_router_topk) // model_cfg.num_experts
        assert counts.active == built - unvisited
        assert counts.active < counts.total
    else:
        assert counts.active == counts.total
