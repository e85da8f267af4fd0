"""Random packed batches for the diffusion tests (documents on block boundaries)."""

from __future__ import annotations

import torch

from megatron_uni.data.batch import MODALITY_IMAGE, MODALITY_TEXT, Batch
from megatron_uni.tokens import Vocabulary


def tiny_vocab() -> Vocabulary:
    return Vocabulary.synthetic(text_size=1024, num_image_codes=256)


def random_batch(gen: torch.Generator, batch_size: int, seq_length: int, block_size: int,
                 vocab: Vocabulary, prompt_blocks: int = 1, max_docs: int = 3) -> Batch:
    """Rows of up to ``max_docs`` documents, each a clean prompt of ``prompt_blocks`` blocks then a
    maskable response, then row padding (doc -1, not maskable)."""
    num_blocks = seq_length // block_size
    doc_ids = torch.full((batch_size, seq_length), -1, dtype=torch.int32)
    maskable = torch.zeros(batch_size, seq_length, dtype=torch.bool)
    position_ids = torch.zeros(batch_size, seq_length, dtype=torch.int64)
    for row in range(batch_size):
        block = 0
        for doc in range(max_docs):
            if block >= num_blocks:
                break
            length = int(torch.randint(1, num_blocks - block + 1, (1,), generator=gen))
            start, stop = block * block_size, (block + length) * block_size
            doc_ids[row, start:stop] = doc
            position_ids[row, start:stop] = torch.arange(stop - start)
            maskable[row, start + min(prompt_blocks, length - 1) * block_size:stop] = True
            block += length
            if torch.rand(1, generator=gen).item() < 0.3:
                break
    tokens = torch.randint(0, vocab.text_size - 100, (batch_size, seq_length), generator=gen)
    image = torch.rand(batch_size, seq_length, generator=gen) < 0.3
    tokens = torch.where(image, vocab.image_offset + tokens % vocab.num_image_codes, tokens)
    modality = torch.where(image, MODALITY_IMAGE, MODALITY_TEXT).to(torch.int8)
    return Batch(tokens=tokens, maskable=maskable, modality=modality, doc_ids=doc_ids, position_ids=position_ids)


def complementary_layouts(shared_clean: bool, prefix_aware: bool, seeds=range(3)):
    """Attention layouts of random complementary-masked micro-batches (4 rows of 64, block 8),
    in the two-row or shared-clean form, full or prefix-aware: the layouts every mask
    implementation and counter is checked on."""
    from megatron_uni.config import DiffusionConfig
    from megatron_uni.diffusion.inputs import build_inputs

    vocab = tiny_vocab()
    cfg = DiffusionConfig(complementary=True, shared_clean=shared_clean, prefix_aware=prefix_aware)
    for seed in seeds:
        batch = random_batch(torch.Generator().manual_seed(seed), 4, 64, 8, vocab)
        yield build_inputs(batch, vocab, cfg, torch.Generator().manual_seed(seed), block_size=8, pad_multiple=16).layout
