"""megatron_uni/model/flops.py against hand arithmetic, the mask rule and tools/scaling_model.py."""

import os
import runpy

import pytest
import torch

from megatron_uni.attention.masks import dense_mask
from megatron_uni.config import load_config
from megatron_uni.diffusion.layout import full_layout, shared_clean_layout
from megatron_uni.model import flops
from megatron_uni.model.params import count_parameters
from diffusion_helpers import complementary_layouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(name: str):
    return load_config(os.path.join(REPO, "recipes", "model", f"{name}.yaml")).model


def test_tiny_linear_weights_by_hand():
    m = _model("tiny")  # h 64, 4 q / 2 kv heads of 16, dense FFN 128, 8 experts of 32 top-2, shared 32, vocab 1280
    attention = 64 * (64 + 2 * 32) + 64 * 64                # 12,288
    dense_ffn = 3 * 64 * 128                                # 24,576
    moe = 64 * 8 + 2 * 3 * 64 * 32 + 3 * 64 * 32            # router + top-2 + shared = 18,944
    output = 64 * 1280                                      # 81,920
    assert flops.linear_weights_per_position(m) == 4 * attention + dense_ffn + 3 * moe + output == 212_480
    assert flops.linear_forward_flops(m, 10) == 2 * 212_480 * 10


def test_tiny_attention_pairs_and_step_by_hand():
    m = _model("tiny")
    doc = torch.zeros(1, 8, dtype=torch.int32)          # one document, L = 8, two blocks of 4
    full = full_layout(doc, block_size=4)               # 2L = 16
    # noisy block 0: its 4 keys; noisy block 1: 4 + clean block 0; clean block j: clean blocks <= j
    assert flops.attended_pairs(full) == 4 * 4 + 4 * 8 + 4 * 4 + 4 * 8 == 96
    shared = shared_clean_layout(doc, block_size=4)     # 3L = 24: two noisy copies, one clean
    assert flops.attended_pairs(shared) == 2 * (4 * 4 + 4 * 8) + (4 * 4 + 4 * 8) == 144
    step = flops.model_flops(m, full)
    assert step.positions == 16
    assert step.attention_forward == 4 * 96 * 4 * 16 * 4   # 2 x 2 flops x pairs x heads x head dim x layers
    assert step.forward == 2 * 212_480 * 16 + step.attention_forward
    assert step.train == 3 * step.forward                 # no recompute credit
    assert (step + step).train == 2 * step.train


@pytest.mark.parametrize("shared_clean,prefix_aware", [(False, False), (True, False), (False, True), (True, True)])
def test_attended_pairs_equal_the_dense_mask(shared_clean, prefix_aware):
    for layout in complementary_layouts(shared_clean, prefix_aware):
        assert flops.attended_pairs(layout) == int((~dense_mask(layout)).sum())


def test_single_document_closed_form_and_scaling_model():
    """One document of L tokens, block B: exact pairs L(L+B) (full) and 1.5 L(L+B) (shared clean);
    the scaling model's FlexAttention tiles cover L(L+2T) pairs, its linear weights are ours."""
    scaling = runpy.run_path(os.path.join(REPO, "tools", "scaling_model.py"), run_name="scaling_model")
    m = _model("llada2_uni_16b")
    length, block, tile = 1024, 32, 128
    doc = torch.zeros(1, length, dtype=torch.int32)
    assert flops.attended_pairs(full_layout(doc, block)) == length * (length + block)
    assert flops.attended_pairs(shared_clean_layout(doc, block)) == 3 * length * (length + block) // 2
    assert scaling["attended_tiles"](length, "full") * tile ** 2 == length * (length + 2 * tile)
    stage = scaling["Stage"]("x", length, "full", 1, recompute="selective")
    exact = flops.model_flops(m, full_layout(doc, block)).train
    tiles = scaling["train_flops_per_sample"](m, stage)
    assert exact < tiles < exact * 1.01     # linear FLOPs identical; attention differs by tile padding only
    # active weights = active parameters without norms and the (lookup) input embedding
    counts = count_parameters(m)
    norms = m.num_layers * (2 * m.kv_channels + 2 * m.hidden_size) + m.hidden_size
    assert flops.linear_weights_per_position(m) == counts.active - norms - m.vocab * m.hidden_size
