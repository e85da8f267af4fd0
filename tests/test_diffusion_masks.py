"""The three mask implementations equal the brute-force per-pair rule."""

import itertools

import pytest
import torch

from megatron_uni.attention.layout import AttentionLayout
from megatron_uni.attention.masks import BlockMaskCache, block_mask, dense_mask, pair_allowed
from megatron_uni.config import DiffusionConfig
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.layout import full_layout
from diffusion_helpers import random_batch, tiny_vocab


def brute_force(layout: AttentionLayout) -> torch.Tensor:
    b, s = layout.batch_size, layout.seq_length
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for row, q, k in itertools.product(range(b), range(s), range(s)):
        out[row, 0, q, k] = not pair_allowed(layout, row, q, k)
    return out


def random_layouts(count: int):
    gen = torch.Generator().manual_seed(7)
    vocab = tiny_vocab()
    for i in range(count):
        block = [1, 2, 4, 8, 16][i % 5]
        length = block * int(torch.randint(1, 9, (1,), generator=gen))
        batch = random_batch(gen, 2, length, block, vocab)
        prefix = i % 2 == 1
        shared = i % 3 == 2  # the shared-clean complementary layout [noisy_a | noisy_b | clean]
        cfg = DiffusionConfig(t_min=0.2, t_max=0.9, prefix_aware=prefix, complementary=shared, shared_clean=shared)
        inputs = build_inputs(batch, vocab, cfg, gen, block_size=block, pad_multiple=8)
        yield inputs.layout


def test_paper_rule_by_hand():
    # one document, L=4, block 2: the 8x8 mask of the LLaDA2 report (eq. 3), allowed = 1
    layout = full_layout(torch.zeros(1, 4, dtype=torch.int32), block_size=2)
    expected = torch.tensor([
        # noisy b0  noisy b1  clean b0  clean b1
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(~dense_mask(layout)[0, 0], expected)
    assert torch.equal(brute_force(layout)[0, 0], ~expected)


def test_documents_never_attend_each_other():
    doc_ids = torch.tensor([[0, 0, 1, 1, -1, -1]], dtype=torch.int32)
    layout = full_layout(doc_ids, block_size=2)
    allowed = ~dense_mask(layout)[0, 0]
    docs = layout.doc[0]
    assert not (allowed & (docs[:, None] != docs[None, :])).any()
    assert allowed.diagonal().all()  # no empty softmax row


def test_dense_equals_brute_force_on_random_layouts():
    layouts = list(random_layouts(10))
    assert sum(int(layout.copy.max()) == 1 for layout in layouts) == 3  # shared-clean rows are covered
    for layout in layouts:
        assert torch.equal(dense_mask(layout), brute_force(layout))


def test_block_mask_equals_dense_on_random_layouts():
    for layout in random_layouts(6):
        bm = block_mask(layout)
        b, s = layout.batch_size, layout.seq_length
        dense = dense_mask(layout)
        # the BlockMask's element rule, evaluated on every (row, q, k)
        rows, qs, ks = torch.meshgrid(torch.arange(b), torch.arange(s), torch.arange(s), indexing="ij")
        assert torch.equal(~bm.mask_mod(rows, None, qs, ks), dense[:, 0])
        # and its tile map: a tile it skips must be fully masked in the reference
        tile = bm.BLOCK_SIZE[0]
        tiles = bm.to_dense()
        for row, qt, kt in itertools.product(range(b), range(tiles.shape[2]), range(tiles.shape[3])):
            if not tiles[row, 0, qt, kt]:
                assert dense[row, 0, qt * tile:(qt + 1) * tile, kt * tile:(kt + 1) * tile].all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_masked_sdpa():
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(3)
    for layout in random_layouts(6):
        b, s = layout.batch_size, layout.seq_length
        q, k, v = (torch.randn(b, 4, s, 8, generator=gen) for _ in range(3))
        flex = flex_attention(q, k, v, block_mask=block_mask(layout))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~dense_mask(layout))
        torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_block_mask_cache_reuses_and_rebuilds():
    layout = full_layout(torch.zeros(1, 8, dtype=torch.int32), block_size=4)
    cache = BlockMaskCache(size=2)
    descriptor = layout.descriptor()
    first = cache.get(descriptor)
    assert cache.get(descriptor) is first and cache.builds == 1
    descriptor[0, 1, 0] = 1  # in-place change bumps the version: must rebuild
    cache.get(descriptor)
    assert cache.builds == 2
