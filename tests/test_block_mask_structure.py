"""``masks.block_mask`` builds the FlexAttention BlockMask from the block structure; it equals
``create_block_mask`` over the dense rule: tile lists, full/partial split and attention output."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from megatron_uni.attention.layout import FILLER_DOC, AttentionLayout
from megatron_uni.attention.masks import FLEX_TILE, block_mask, mask_mod
from megatron_uni.diffusion.layout import compact_rows, full_layout, kept_positions

from test_diffusion_masks import random_layouts

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def packed_layout(seed: int, length: int, block: int, prefix_aware: bool, rows: int = 2) -> AttentionLayout:
    """Rows of several documents (block-aligned, random lengths) and row padding (doc -1); with
    ``prefix_aware`` a random supervised subset is kept and compacted (filler doc at the end)."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = torch.full((rows, length), -1, dtype=torch.int32)
    for row in range(rows):
        start, doc = 0, 0
        while start < length and torch.rand(1, generator=gen) < 0.85:
            blocks = int(torch.randint(1, max(2, length // block // 2), (1,), generator=gen))
            doc_ids[row, start:start + blocks * block] = doc
            start, doc = start + blocks * block, doc + 1
    layout = full_layout(doc_ids, block)
    if not prefix_aware:
        return layout
    supervised = (torch.rand(layout.doc.shape, generator=gen) < 0.02) & ~layout.clean & (layout.doc >= 0)
    keep = kept_positions(layout, supervised)
    (doc, blocks, clean), _ = compact_rows(keep, (layout.doc, FILLER_DOC), (layout.block, -1), (layout.clean, False),
                                           multiple=16)
    return AttentionLayout(doc, blocks, clean)


def reference(layout: AttentionLayout):
    s = layout.seq_length
    return create_block_mask(mask_mod(layout), layout.batch_size, None, s, s, device="cpu", BLOCK_SIZE=FLEX_TILE)


LAYOUTS = [(0, 640, 32, False), (1, 640, 32, True), (2, 384, 8, False), (3, 400, 4, True),
           (4, 512, 128, False), (5, 768, 256, True), (6, 300, 16, True)]  # seed, L, block, prefix-aware


@pytest.mark.parametrize("seed,length,block,prefix", LAYOUTS)
def test_tile_lists_equal_create_block_mask(seed, length, block, prefix):
    layout = packed_layout(seed, length, block, prefix)
    got, want = block_mask(layout), reference(layout)
    assert got.seq_lengths == want.seq_lengths and got.BLOCK_SIZE == want.BLOCK_SIZE
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert int(want.kv_num_blocks.sum() + want.full_kv_num_blocks.sum()) > 0


def test_one_long_document_has_full_and_partial_tiles():
    layout = full_layout(torch.zeros(1, 640, dtype=torch.int32), 32)
    got, want = block_mask(layout), reference(layout)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert int(want.full_kv_num_blocks.sum()) > 0 and int(want.kv_num_blocks.sum()) > 0


def test_small_random_layouts_equal_create_block_mask():
    for layout in random_layouts(10):  # sequences shorter than one tile, filler, padding
        got, want = block_mask(layout), reference(layout)
        for field in FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_attention_output_equals_create_block_mask():
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    layout = packed_layout(9, 320, 16, True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.batch_size, 2, layout.seq_length, 16, generator=gen) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=block_mask(layout))
    want = flex_attention(q, k, v, block_mask=reference(layout))
    assert torch.equal(got, want)
