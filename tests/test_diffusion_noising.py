"""Noising: ratios, maskable-only masking, complementary pairs, antithetic strata; the 2L inputs."""

import pytest
import torch

from megatron_uni.data.batch import IGNORE_INDEX, Batch
from megatron_uni.config import ConfigError, DiffusionConfig
from megatron_uni.data.sampler import microbatch_plan
from megatron_uni.diffusion.inputs import build_inputs, per_document_sum
from megatron_uni.diffusion.noising import RowKeys, noise_batch, sample_ratio
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
    doc_ids = torch.zeros(8, 20, dtype=torch.int32)
    t = sample_ratio(doc_ids, 4, cfg, gen)
    assert t.min() >= 0.2 and t.max() <= 0.6
    per_block = t[:, ::4]                    # 8 samples x 5 blocks
    assert torch.equal(t, per_block.repeat_interleave(4, 1))
    first = ((per_block[:, 0] - 0.2) / 0.4 * 8).floor().long().sort().values
    assert torch.equal(first, torch.arange(8))  # first blocks: one per stratum of the batch
    inside = ((per_block - 0.2) / 0.4 * 5).floor().long().sort(1).values
    assert torch.equal(inside, torch.arange(5).expand(8, 5))  # a row's blocks: one per stratum of the row


def test_each_document_of_a_packed_row_draws_its_own_ratio():
    doc_ids = torch.tensor([[0] * 8 + [1] * 8 + [2] * 8 + [-1] * 8] * 4, dtype=torch.int32)
    keys = RowKeys(seed=5, rows=(0, 1, 2, 3), global_batch_size=4)
    for antithetic in (False, True):
        t = sample_ratio(doc_ids, 8, DiffusionConfig(t_min=0.3, t_max=0.8, antithetic=antithetic), keys=keys)
        per_doc = t[:, [0, 8, 16]]
        assert torch.equal(t[:, :24], per_doc.repeat_interleave(8, 1))  # constant inside a document
        assert (per_doc[:, 0] != per_doc[:, 1]).all() and (per_doc[:, 1] != per_doc[:, 2]).all()


def test_antithetic_strata_span_the_global_batch_not_the_microbatch():
    cfg = DiffusionConfig(t_min=0.0, t_max=1.0, antithetic=True)
    doc_ids = torch.zeros(2, 16, dtype=torch.int32)
    ratios = torch.cat([sample_ratio(doc_ids, 8, cfg, keys=RowKeys(7, (8 + 2 * k, 9 + 2 * k), 8))[:, 0]
                        for k in range(4)])    # iteration 1 of an 8-row global batch, 4 micro-batches
    assert torch.equal((ratios * 8).floor().long().sort().values, torch.arange(8))


def test_row_noise_is_the_same_at_any_data_parallel_and_microbatch_size():
    """DP1 x mbs4 and DP2 x mbs2 (global batch 8, two iterations) see identical noisy ids and weights per row."""
    vocab = tiny_vocab()
    dataset = random_batch(torch.Generator().manual_seed(9), 16, 64, 8, vocab)  # global rows 0..15
    cfg = DiffusionConfig(t_min=0.2, t_max=0.9, antithetic=True, complementary=True, weighting="elbo")

    def per_row(dp_size, mbs):
        out = {}
        for iteration in range(2):
            for rank in range(dp_size):
                for k in range(8 // (dp_size * mbs)):
                    rows = microbatch_plan(iteration, k, rank, dp_size, mbs, 8)
                    batch = Batch(**{n: v[rows] for n, v in dataset.as_dict().items()})
                    inputs = build_inputs(batch, vocab, cfg, block_size=8, keys=RowKeys(11, tuple(rows), 8))
                    for i, row in enumerate(rows):  # complementary: rows 2i, 2i+1 are row i's pair
                        out[row] = (inputs.input_ids[2 * i:2 * i + 2], inputs.loss_weights[2 * i:2 * i + 2])
        return out

    a, b = per_row(1, 4), per_row(2, 2)
    assert sorted(a) == sorted(b) == list(range(16))
    for row in a:
        assert torch.equal(a[row][0], b[row][0]) and torch.equal(a[row][1], b[row][1]), f"row {row}"
    assert not torch.equal(a[0][0], a[1][0])


def test_complementary_draws_t_from_the_symmetric_band_and_needs_it():
    keys = RowKeys(seed=1, rows=tuple(range(64)), global_batch_size=64)
    t = sample_ratio(torch.zeros(64, 8, dtype=torch.int32), 8,
                     DiffusionConfig(t_min=0.3, t_max=0.8, complementary=True), keys=keys)
    assert t.min() >= 0.3 and t.max() <= 0.7  # so 1 - t lies in [0.3, 0.7] too
    with pytest.raises(ConfigError, match=r"diffusion.complementary=true needs diffusion.t_min=0.6 <= 0.5"):
        DiffusionConfig(t_min=0.6, t_max=0.9, complementary=True)


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
