"""Noising: ratios, maskable-only masking, complementary pairs, antithetic strata; the 2L inputs."""

import torch

from megatron_uni.data.batch import IGNORE_INDEX
from megatron_uni.config import DiffusionConfig
from megatron_uni.diffusion.inputs import build_inputs, per_document_sum
from megatron_uni.diffusion.noising import noise_batch, sample_ratio
from diffusion_helpers import random_batch, tiny_vocab


def test_only_maskable_positions_are_masked_with_the_vocab_mask_id():
    gen = torch.Generator().manual_seed(0)
    vocab = tiny_vocab()
    batch = random_batch(gen, 4, 64, 8, vocab)
    noised = noise_batch(batch, vocab, DiffusionConfig(t_min=0.5, t_max=1.0), 8, gen)
    assert noised.masked.any()
    assert not (noised.masked & ~batch.maskable).any()
    assert (noised.noisy_tokens[noised.masked] == vocab.mask_id).all()
    assert torch.equal(noised.noisy_tokens[~noised.masked], batch.tokens[~noised.masked])


def test_complementary_pairs_supervise_every_maskable_token_exactly_once():
    gen = torch.Generator().manual_seed(1)
    vocab = tiny_vocab()
    batch = random_batch(gen, 3, 64, 8, vocab)
    noised = noise_batch(batch, vocab, DiffusionConfig(t_min=0.3, t_max=0.8, complementary=True), 8, gen)
    assert noised.masked.shape[0] == 6
    first, second = noised.masked[0::2], noised.masked[1::2]
    assert torch.equal(noised.batch.tokens[0::2], batch.tokens)
    assert torch.equal(first ^ second, batch.maskable)   # each maskable position in exactly one
    assert not (first & second).any()
    torch.testing.assert_close(noised.ratio[0::2] + noised.ratio[1::2], torch.ones(3, 64))


def test_ratio_range_per_block_and_antithetic_strata():
    gen = torch.Generator().manual_seed(2)
    cfg = DiffusionConfig(t_min=0.2, t_max=0.6, per_block=True, antithetic=True)
    t = sample_ratio(8, 20, 4, cfg, gen)
    assert t.min() >= 0.2 and t.max() <= 0.6
    per_block = t[:, ::4]                    # 8 samples x 5 blocks = 40 draws
    assert torch.equal(t, per_block.repeat_interleave(4, 1))
    strata = ((per_block - 0.2) / 0.4 * 40).floor().long().flatten().sort().values
    assert torch.equal(strata, torch.arange(40))  # one draw per stratum


def test_full_layout_inputs():
    gen = torch.Generator().manual_seed(3)
    vocab = tiny_vocab()
    batch = random_batch(gen, 2, 32, 4, vocab)
    inputs = build_inputs(batch, vocab, DiffusionConfig(t_min=0.5, t_max=0.9), gen, block_size=4)
    L = 32
    assert inputs.input_ids.shape == (2, 2 * L)
    assert torch.equal(inputs.input_ids[:, L:], batch.tokens)
    assert torch.equal(inputs.position_ids[:, :L], batch.position_ids)
    assert torch.equal(inputs.position_ids[:, L:], batch.position_ids)
    masked = inputs.input_ids[:, :L] == vocab.mask_id
    assert torch.equal(inputs.labels[:, :L][masked], batch.tokens[masked])   # no shift
    assert (inputs.labels[:, :L][~masked] == IGNORE_INDEX).all() and (inputs.labels[:, L:] == IGNORE_INDEX).all()
    assert torch.equal(inputs.loss_weights > 0, inputs.labels != IGNORE_INDEX)
    assert inputs.normalizer.item() == masked.sum().item()


def test_weightings():
    gen = torch.Generator().manual_seed(4)
    vocab = tiny_vocab()
    batch = random_batch(gen, 2, 64, 8, vocab)
    sqrt = build_inputs(batch, vocab, DiffusionConfig(t_min=0.4, t_max=0.4, weighting="sqrt_masked"),
                        torch.Generator().manual_seed(9), block_size=8)
    elbo = build_inputs(batch, vocab, DiffusionConfig(t_min=0.4, t_max=0.4, weighting="elbo"),
                        torch.Generator().manual_seed(9), block_size=8)
    masked = sqrt.labels[:, :64] != IGNORE_INDEX
    n_doc = per_document_sum(masked.float(), batch.doc_ids)
    torch.testing.assert_close(sqrt.loss_weights[:, :64][masked], n_doc[masked].rsqrt())
    # sum over documents of sqrt(N_d)
    docs = {(r, int(d)) for r in range(2) for d in batch.doc_ids[r][masked[r]].tolist()}
    expected = sum(float(n_doc[r][(batch.doc_ids[r] == d) & masked[r]][0].sqrt()) for r, d in docs)
    assert abs(sqrt.normalizer.item() - expected) < 1e-4
    torch.testing.assert_close(elbo.loss_weights[:, :64][masked], torch.full((int(masked.sum()),), 1 / 0.4))
    assert elbo.normalizer.item() == batch.maskable.sum().item()


def test_prefix_aware_inputs_are_shorter_and_keep_every_label():
    gen = torch.Generator().manual_seed(5)
    vocab = tiny_vocab()
    batch = random_batch(gen, 3, 128, 8, vocab, prompt_blocks=6)
    cfg = DiffusionConfig(t_min=0.3, t_max=0.8)
    full = build_inputs(batch, vocab, cfg, torch.Generator().manual_seed(1), block_size=8, pad_multiple=16)
    compact = build_inputs(batch, vocab, DiffusionConfig(t_min=0.3, t_max=0.8, prefix_aware=True),
                           torch.Generator().manual_seed(1), block_size=8, pad_multiple=16)
    assert compact.input_ids.shape[1] < full.input_ids.shape[1] and compact.input_ids.shape[1] % 16 == 0
    for row in range(3):
        assert sorted(compact.labels[row][compact.labels[row] != IGNORE_INDEX].tolist()) == \
            sorted(full.labels[row][full.labels[row] != IGNORE_INDEX].tolist())
    assert compact.loss_weights.sum() == full.loss_weights.sum()
    assert compact.normalizer == full.normalizer


def test_attention_mask_descriptor_is_one_tensor_per_micro_batch():
    from megatron_uni.attention.layout import AttentionLayout

    gen = torch.Generator().manual_seed(6)
    vocab = tiny_vocab()
    inputs = build_inputs(random_batch(gen, 2, 32, 4, vocab), vocab, DiffusionConfig(), gen, block_size=4)
    descriptor = inputs.attention_mask
    assert inputs.attention_mask is descriptor and descriptor.dtype == torch.int32
    back = AttentionLayout.from_descriptor(descriptor)
    assert torch.equal(back.doc, inputs.layout.doc) and torch.equal(back.clean, inputs.layout.clean)


def test_documents_off_block_boundaries_are_refused():
    import pytest

    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(7), 1, 16, 4, vocab)
    batch.doc_ids[0, :6] = 0
    batch.doc_ids[0, 6:] = 1     # document 1 starts at position 6, block size 4
    with pytest.raises(ValueError, match="document 1 of row 0 starts at position 6"):
        build_inputs(batch, vocab, DiffusionConfig(), block_size=4)
