"""The BDLM layouts of packed rows, as :class:`~megatron_uni.attention.layout.AttentionLayout`.

A BDLM row for a packed sample of length L is ``[noisy | clean]`` (2L positions, both copies
with the sample's position ids): :func:`full_layout`. The prefix-aware layout keeps only the
positions that can influence a supervised logit (:func:`kept_positions`, :func:`compact_rows`),
so a row may be shorter than 2L.

Complementary masking gives each sample two noisy copies (masks m and its complement) whose
clean copies are identical. The shared-clean layout puts both in one row
``[noisy_a | noisy_b | clean]`` (3L instead of two 2L rows: 25% fewer positions):
:func:`shared_clean_layout`, :func:`share_clean`. Each noisy copy sees its own block and the
shared earlier clean blocks, never the other copy (the layout's ``copy`` id), and the clean
copy only sees clean positions -- so every logit, hence the loss and every gradient, equals
the two-row form's (the clean copy's outputs were computed twice there, once here).
"""

from __future__ import annotations

import torch

from megatron_uni.attention.layout import AttentionLayout
from megatron_uni.rounding import round_up


def block_index(seq_length: int, block_size: int, batch_size: int, device=None) -> torch.Tensor:
    """``[b, L]`` block index of each position of a packed row (documents start on block boundaries)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    blocks = torch.arange(seq_length, device=device, dtype=torch.int32) // block_size
    return blocks.unsqueeze(0).expand(batch_size, seq_length)


def check_block_aligned(doc_ids: torch.Tensor, block_size: int) -> None:
    """Documents must start on block boundaries (the Batch contract); name the first offender."""
    changes = torch.ones_like(doc_ids, dtype=torch.bool)
    changes[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = changes & (doc_ids >= 0)
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    bad = starts & (positions % block_size != 0)
    if bad.any():
        row, pos = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"Batch.doc_ids: document {int(doc_ids[row, pos])} of row {row} starts at position "
                         f"{pos}, not on a block boundary (block size {block_size}); the data pipeline must "
                         "pad documents to a multiple of the block size")


def full_layout(doc_ids: torch.Tensor, block_size: int) -> AttentionLayout:
    """The 2L layout ``[noisy | clean]`` of packed rows with document ids ``doc_ids`` ``[b, L]``."""
    b, length = doc_ids.shape
    blocks = block_index(length, block_size, b, doc_ids.device)
    clean = torch.zeros(b, 2 * length, dtype=torch.bool, device=doc_ids.device)
    clean[:, length:] = True
    return AttentionLayout(doc=torch.cat([doc_ids, doc_ids], 1).int(), block=torch.cat([blocks, blocks], 1).int(),
                           clean=clean)


def shared_clean_layout(doc_ids: torch.Tensor, block_size: int) -> AttentionLayout:
    """The 3L layout ``[noisy_a | noisy_b | clean]`` of packed rows with document ids ``doc_ids`` ``[b, L]``."""
    full = full_layout(doc_ids, block_size)
    length = doc_ids.shape[1]
    copy = torch.zeros(doc_ids.shape[0], 3 * length, dtype=torch.int32, device=doc_ids.device)
    copy[:, length:2 * length] = 1
    noisy, clean = slice(0, length), slice(length, 2 * length)
    three = lambda t: torch.cat([t[:, noisy], t[:, noisy], t[:, clean]], 1)  # noqa: E731
    return AttentionLayout(doc=three(full.doc), block=three(full.block), clean=three(full.clean), copy=copy)


def share_clean(pairs: torch.Tensor) -> torch.Tensor:
    """Complementary pairs of 2L rows ``[2b, 2L]`` (rows 2i, 2i+1 share their clean half) -> ``[b, 3L]``.

    Row i becomes ``[noisy half of 2i | noisy half of 2i+1 | clean half of 2i]``, the order of
    :func:`shared_clean_layout`; the clean half of row 2i+1 is a duplicate and is dropped.
    """
    if pairs.shape[0] % 2 or pairs.shape[1] % 2:
        raise ValueError(f"share_clean needs [2b, 2L] complementary pairs, got {tuple(pairs.shape)}")
    length = pairs.shape[1] // 2
    return torch.cat([pairs[0::2, :length], pairs[1::2, :length], pairs[0::2, length:]], 1)


def kept_positions(layout: AttentionLayout, supervised: torch.Tensor) -> torch.Tensor:
    """Bool ``[b, S]``: positions of a full layout that can influence a supervised logit.

    ``supervised`` ``[b, S]`` marks positions carrying loss (masked tokens of the noisy copy).
    Why this set is exact: a noisy position is attended only by noisy queries of its own block,
    so a noisy block without a supervised token influences nothing supervised (each noisy
    copy of a shared-clean row separately); a clean position of block i is attended by clean
    queries of blocks >= i and noisy queries (of any copy) of blocks > i of its document, so it
    matters only if a kept noisy block lies after it.
    Dropping the rest removes keys no kept query could see, so kept outputs are unchanged.
    """
    doc, block, clean = layout.doc.long(), layout.block.long(), layout.clean
    num_blocks = int(block.max().item()) + 1 if block.numel() else 1
    num_docs = int(doc.max().item()) + 2 if doc.numel() else 1  # doc -1 -> slot 0
    num_copies = int(layout.copy.max().item()) + 1 if layout.copy.numel() else 1
    key = ((doc + 1) * num_copies + layout.copy.long()) * num_blocks + block  # one slot per (doc, copy, block)
    slots = num_docs * num_copies * num_blocks
    noisy_has_loss = torch.zeros(layout.batch_size, slots, dtype=torch.bool, device=doc.device)
    noisy_has_loss.scatter_reduce_(1, key, supervised & ~clean, reduce="amax")
    keep_noisy = noisy_has_loss.gather(1, key) & ~clean
    # last block of each document that keeps a noisy copy (-1 when none)
    last_noisy = torch.full((layout.batch_size, num_docs), -1, dtype=torch.long, device=doc.device)
    last_noisy.scatter_reduce_(1, doc + 1, torch.where(keep_noisy, block, -1), reduce="amax")
    keep_clean = clean & (block < last_noisy.gather(1, doc + 1))
    return keep_noisy | keep_clean


def compact_rows(keep: torch.Tensor, *tensors_and_fill, multiple: int = 1):
    """Gather the kept positions of each row to the front; pad rows to a common length.

    ``tensors_and_fill`` is a sequence of ``(tensor [b, S], fill value)``. Returns the list of
    compacted tensors ``[b, S']`` (S' = max kept per row, rounded up to ``multiple``) and the
    bool ``[b, S']`` marking real (non-filler) positions.
    """
    counts = keep.sum(1)
    width = int(counts.max().item()) if keep.numel() else 0
    width = max(multiple, round_up(width, multiple))
    # stable sort puts kept positions first, in their original order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    if order.shape[1] < width:  # fewer positions than the rounded width: extend with filler slots
        order = torch.cat([order, order[:, :1].expand(-1, width - order.shape[1])], 1)
    real = torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    out = []
    for tensor, fill in tensors_and_fill:
        gathered = tensor.gather(1, order)
        out.append(torch.where(real, gathered, torch.full_like(gathered, fill)))
    return out, real
