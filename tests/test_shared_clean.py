"""The shared-clean complementary layout ``[noisy_a | noisy_b | clean]`` (3L per pair).

It must be the two-row complementary form (two ``[noisy | clean]`` rows per sample) with the
duplicate clean copy removed: the same loss and every gradient on the tiny model, 25% fewer
positions, the two noisy copies blind to each other, and compatible with prefix-aware compaction.
"""

import pytest
import torch

from megatron_uni.attention.layout import FILLER_DOC, AttentionLayout
from megatron_uni.attention.masks import dense_mask, pair_allowed
from megatron_uni.config import ConfigError, DiffusionConfig, load_config
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.layout import shared_clean_layout
from megatron_uni.diffusion.losses import combine, loss_sums
from megatron_uni.model.block_attention import block_attention_spec
from megatron_uni.model.builder import build_model
from diffusion_helpers import random_batch, tiny_vocab

BLOCK = 8


def _inputs(shared: bool, prefix_aware: bool = False, seed: int = 0, length: int = 64, weighting: str = "sqrt_masked"):
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(seed), 2, length, BLOCK, vocab, prompt_blocks=3)
    cfg = DiffusionConfig(t_min=0.2, t_max=0.9, complementary=True, shared_clean=shared, prefix_aware=prefix_aware,
                          weighting=weighting)
    return build_inputs(batch, vocab, cfg, torch.Generator().manual_seed(seed + 100), block_size=BLOCK,
                        pad_multiple=16)


def test_rule_by_hand_on_one_document():
    # L=4, block 2: noisy_a (0-3), noisy_b (4-7), clean (8-11); allowed = 1
    layout = shared_clean_layout(torch.zeros(1, 4, dtype=torch.int32), block_size=2)
    noisy_b0 = [1, 1, 0, 0]
    noisy_b1 = [0, 0, 1, 1]
    zeros = [0, 0, 0, 0]
    expected = torch.tensor([
        noisy_b0 + zeros + zeros, noisy_b0 + zeros + zeros,
        noisy_b1 + zeros + [1, 1, 0, 0], noisy_b1 + zeros + [1, 1, 0, 0],
        zeros + noisy_b0 + zeros, zeros + noisy_b0 + zeros,
        zeros + noisy_b1 + [1, 1, 0, 0], zeros + noisy_b1 + [1, 1, 0, 0],
        zeros + zeros + [1, 1, 0, 0], zeros + zeros + [1, 1, 0, 0],
        zeros + zeros + [1, 1, 1, 1], zeros + zeros + [1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(~dense_mask(layout)[0, 0], expected)
    assert all(pair_allowed(layout, 0, q, k) == bool(expected[q, k]) for q in range(12) for k in range(12))


def test_descriptor_round_trips_the_copy_id():
    layout = _inputs(True).layout
    back = AttentionLayout.from_descriptor(layout.descriptor())
    assert torch.equal(back.copy, layout.copy) and int(layout.copy.max()) == 1


def test_inputs_are_the_pairs_with_one_clean_copy():
    pairs, shared = _inputs(False), _inputs(True)
    length = 64
    assert pairs.input_ids.shape == (4, 2 * length) and shared.input_ids.shape == (2, 3 * length)
    assert shared.num_tokens * 4 == pairs.num_tokens * 3  # 25% fewer positions
    for name in ("input_ids", "position_ids", "labels", "loss_weights", "modality"):
        two, three = getattr(pairs, name), getattr(shared, name)
        assert torch.equal(three[:, :length], two[0::2, :length]), name
        assert torch.equal(three[:, length:2 * length], two[1::2, :length]), name
        assert torch.equal(three[:, 2 * length:], two[0::2, length:]), name
        assert torch.equal(two[0::2, length:], two[1::2, length:]), name  # the dropped copy is a duplicate
    assert torch.equal(shared.normalizer, pairs.normalizer)
    # complementary: each maskable token supervised exactly once per pair
    supervised = (shared.labels != -100)
    assert not (supervised[:, :length] & supervised[:, length:2 * length]).any()


def test_shared_clean_needs_complementary():
    with pytest.raises(ConfigError, match="diffusion.shared_clean=true needs diffusion.complementary=true"):
        DiffusionConfig(shared_clean=True)


def test_prefix_aware_compaction_keeps_each_copy_separately():
    full, compact = _inputs(True, seed=3), _inputs(True, prefix_aware=True, seed=3)
    assert (compact.layout.doc != FILLER_DOC).sum() < full.num_tokens
    # every supervised token survives compaction, in its own copy
    real = compact.layout.doc != FILLER_DOC
    for copy in (0, 1):
        kept = (compact.labels != -100) & (compact.layout.copy == copy) & ~compact.layout.clean & real
        want = (full.labels != -100) & (full.layout.copy == copy) & ~full.layout.clean
        assert kept.sum(1).tolist() == want.sum(1).tolist()


@pytest.fixture(scope="module")
def model(single_process):
    cfg = load_config("recipes/model/tiny.yaml").model
    return build_model(cfg, core_attention=block_attention_spec()).eval()


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    ce = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=inputs.model_labels)
    loss = combine(loss_sums(ce, inputs)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    (loss_got, grads_got), (loss_want, grads_want) = got, want
    torch.testing.assert_close(loss_got, loss_want, atol=0, rtol=1e-6)
    assert grads_got.keys() == grads_want.keys() and len(grads_want) > 10
    for name, grad in grads_want.items():
        # relative to the tensor's scale: elementwise rtol is meaningless on entries near 0
        error = (grads_got[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error < 5e-6, (name, float(error))  # measured <= 9.1e-7


@pytest.mark.parametrize("weighting", ["sqrt_masked", "elbo"])
def test_same_loss_and_every_gradient_as_two_rows(model, weighting):
    pairs = _inputs(False, seed=1, weighting=weighting)
    shared = _inputs(True, seed=1, weighting=weighting)
    _assert_same(_loss_and_grads(model, shared), _loss_and_grads(model, pairs))


def test_compacted_shared_clean_equals_two_full_rows(model):
    pairs = _inputs(False, seed=2, length=128)
    compact = _inputs(True, prefix_aware=True, seed=2, length=128)
    assert compact.num_tokens < 0.75 * pairs.num_tokens
    _assert_same(_loss_and_grads(model, compact), _loss_and_grads(model, pairs))


def test_the_loop_microbatches_use_the_shared_clean_rows(demo):
    """The training path (``MicrobatchSource``) honours the key: b rows of 3L instead of 2b rows of 2L."""
    from megatron_uni.training.batches import MicrobatchSource

    def source(*overrides):
        cfg = load_config("recipes/demo/tiny_cpu.yaml", [f"data.path={demo.dataset}",
                                                         f"data.tokenizer={demo.root / 'tokenizer'}",
                                                         "data.seq_length=128", "diffusion.complementary=true",
                                                         *overrides])
        return MicrobatchSource(cfg)

    pairs, shared = source(), source("diffusion.shared_clean=true")
    two, three = pairs(0, 0, 0, 1), shared(0, 0, 0, 1)
    assert two.input_ids.shape == (4, 256) and three.input_ids.shape == (2, 384)
    assert (pairs.model_seq_length, shared.model_seq_length) == (256, 384)
    assert torch.equal(three.input_ids[:, 128:256], two.input_ids[1::2, :128])
