"""The block-diffusion attention mask: one rule, three implementations.

Rule for query q and key k of the same row (``AttentionLayout`` attributes, ``layout.py``):
they must be in the same document, and

* noisy q -> noisy k: same block and same noisy copy (bidirectional inside the block; the two
  noisy copies of the shared-clean row never see each other);
* noisy q -> clean k: block(k) <  block(q) (strictly earlier clean blocks);
* clean q -> clean k: block(k) <= block(q) (block-causal);
* clean q -> noisy k: never.

Implementations: :func:`pair_allowed` (brute force, the definition), :func:`dense_mask`
(bool ``[b,1,S,S]``, True = masked out, megatron convention) and :func:`block_mask`
(FlexAttention ``BlockMask``, cached). Every position may attend itself under this rule (a
noisy position is in its own block; a clean one is block-causal), so no softmax row is empty.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import torch

from megatron_uni.attention.layout import AttentionLayout
from megatron_uni.rounding import ceil_div


def _allowed(q_doc, q_block, q_clean, q_copy, k_doc, k_block, k_clean, k_copy):
    """The rule on broadcastable tensors (or Python scalars); shared by all implementations."""
    same_doc = q_doc == k_doc
    noisy_noisy = (~q_clean) & (~k_clean) & (q_block == k_block) & (q_copy == k_copy)
    noisy_clean = (~q_clean) & k_clean & (k_block < q_block)
    clean_clean = q_clean & k_clean & (k_block <= q_block)
    return same_doc & (noisy_noisy | noisy_clean | clean_clean)


def pair_allowed(layout: AttentionLayout, b: int, q: int, k: int) -> bool:
    """Brute-force definition for one (row, query, key) pair, written out case by case."""
    if int(layout.doc[b, q]) != int(layout.doc[b, k]):
        return False
    q_block, k_block = int(layout.block[b, q]), int(layout.block[b, k])
    q_clean, k_clean = bool(layout.clean[b, q]), bool(layout.clean[b, k])
    if not q_clean and not k_clean:
        return q_block == k_block and int(layout.copy[b, q]) == int(layout.copy[b, k])
    if not q_clean and k_clean:
        return k_block < q_block
    if q_clean and k_clean:
        return k_block <= q_block
    return False


def allowed_rows(layout: AttentionLayout, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Bool ``[b, 1, stop-start, S]``: True where query rows ``start:stop`` may attend the key."""
    stop = layout.seq_length if stop is None else stop
    q = lambda t: t[:, start:stop, None]  # noqa: E731  [b, q, 1]
    k = lambda t: t[:, None, :]           # noqa: E731  [b, 1, S]
    allowed = _allowed(q(layout.doc), q(layout.block), q(layout.clean), q(layout.copy),
                       k(layout.doc), k(layout.block), k(layout.clean), k(layout.copy))
    return allowed.unsqueeze(1)


def dense_mask(layout: AttentionLayout) -> torch.Tensor:
    """Bool ``[b, 1, S, S]``, True = masked out (the mask megatron's attention modules take)."""
    return ~allowed_rows(layout)


def mask_mod(layout: AttentionLayout):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> allowed`` over the layout's tensors."""
    doc, block, clean, copy = layout.doc, layout.block, layout.clean, layout.copy

    def allowed(b, h, q_idx, kv_idx):
        return _allowed(doc[b, q_idx], block[b, q_idx], clean[b, q_idx], copy[b, q_idx],
                        doc[b, kv_idx], block[b, kv_idx], clean[b, kv_idx], copy[b, kv_idx])

    return allowed


# FlexAttention tile size; sequences are padded to it inside create_block_mask.
FLEX_TILE = 128
_CACHE_SIZE = 8


class BlockMaskCache:
    """``BlockMask`` per layout descriptor tensor, built once and reused by every layer.

    The key is the descriptor tensor's storage pointer, shape and version counter; the cache
    holds a reference to the tensor so that storage cannot be freed and reused by another
    batch while the entry lives -- equal key therefore means equal content, with no device
    sync to compare values. A few entries cover the micro-batches in flight under PP.
    """

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self.entries: "collections.OrderedDict" = collections.OrderedDict()
        self.builds = 0  # how many masks were built (tests assert reuse)

    @staticmethod
    def _key(descriptor: torch.Tensor):
        return (descriptor.data_ptr(), tuple(descriptor.shape), descriptor._version, str(descriptor.device))

    def get(self, descriptor: torch.Tensor):
        key = self._key(descriptor)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][1]
        mask = block_mask(AttentionLayout.from_descriptor(descriptor))
        self.builds += 1
        self.entries[key] = (descriptor, mask)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return mask


def block_mask(layout: AttentionLayout):
    """FlexAttention ``BlockMask`` of the rule (heads broadcast: H=None), built from the block
    structure in O(pieces^2) work -- never the dense ``S x S`` mask that ``create_block_mask``
    evaluates -- and equal to ``create_block_mask(mask_mod(layout), b, None, S, S, BLOCK_SIZE=128)``
    (same tile lists, tests/test_block_mask_structure.py).

    A piece is a run of positions with one (doc, block, clean, copy) inside one 128-tile; the rule is
    constant on a pair of pieces, so a tile pair is empty / full / partial when its piece pairs
    are all disallowed / all allowed (and both tiles lie inside the sequence) / mixed.
    """
    from torch.nn.attention.flex_attention import BlockMask

    length = layout.seq_length
    tiles = [_tile_classes(layout, row, FLEX_TILE) for row in range(layout.batch_size)]
    partial = torch.stack([p for p, _ in tiles]).unsqueeze(1)  # [b, 1, q tiles, kv tiles]
    full = torch.stack([f for _, f in tiles]).unsqueeze(1)
    # kv tiles per query tile, and query tiles per kv tile (for backward) straight from the tile
    # classes: from_kv_blocks would derive the latter through a dense round trip that costs more
    # than everything above
    kv_lists = [*_ordered_tiles(partial), *_ordered_tiles(full)]
    q_lists = [*_ordered_tiles(partial.transpose(-2, -1)), *_ordered_tiles(full.transpose(-2, -1))]
    return BlockMask((length, length), *kv_lists, *q_lists, BLOCK_SIZE=(FLEX_TILE, FLEX_TILE),
                     mask_mod=mask_mod(layout))


def _tile_classes(layout: AttentionLayout, row: int, tile: int):
    """Bool ``[T, T]`` partial and full tile pairs of one row (T = ceil(S / tile))."""
    doc, block, clean, copy = layout.doc[row], layout.block[row], layout.clean[row], layout.copy[row]
    length = doc.shape[0]
    num_tiles = ceil_div(length, tile)
    starts = torch.ones(length, dtype=torch.bool, device=doc.device)
    starts[1:] = ((doc[1:] != doc[:-1]) | (block[1:] != block[:-1]) | (clean[1:] != clean[:-1])
                  | (copy[1:] != copy[:-1]) | (torch.arange(1, length, device=doc.device) % tile == 0))
    first = torch.nonzero(starts).flatten()  # first position of each piece
    pieces = AttentionLayout(doc[first][None], block[first][None], clean[first][None], copy[first][None])
    allowed = allowed_from_codes(mask_codes(pieces), 0, first.numel())[0, 0].flatten().to(torch.int32)
    piece_tile = first // tile
    pair_tile = (piece_tile[:, None] * num_tiles + piece_tile[None, :]).flatten()
    any_allowed = torch.zeros(num_tiles * num_tiles, dtype=torch.int32, device=doc.device)  # int32: CUDA atomics
    any_allowed.scatter_reduce_(0, pair_tile, allowed, reduce="amax")
    all_allowed = torch.ones_like(any_allowed).scatter_reduce_(0, pair_tile, allowed, reduce="amin")
    any_allowed, all_allowed = (t.view(num_tiles, num_tiles).bool() for t in (any_allowed, all_allowed))
    if length % tile:  # the last tile is padded, and padding is never attended: it cannot be full
        all_allowed[-1, :] = False
        all_allowed[:, -1] = False
    return any_allowed & ~all_allowed, all_allowed


def _ordered_tiles(tiles: torch.Tensor):
    """(count, indices) per query tile as BlockMask wants them: the selected kv tiles first,
    ascending, then the others (a stable descending sort of the 0/1 row)."""
    tiles = tiles.to(torch.int32)
    order = torch.argsort(tiles, dim=-1, descending=True, stable=True)
    return tiles.sum(-1).to(torch.int32).contiguous(), order.to(torch.int32).contiguous()


# The rule as interval tests on per-position integer codes, for masks built chunk by chunk (the
# CPU attention builds one per query chunk, in forward and again in backward). Codes are O(S)
# and built once per call; a chunk's mask then costs three comparisons per (query, key) pair
# instead of the ~ten element-wise operations of ``_allowed``.
_DOC_STRIDE = 1 << 31                      # > any int32 block index: documents never overlap
_COPY_BITS = 2                             # noisy codes: block << 2 | copy (up to 4 noisy copies)
_NEVER = torch.iinfo(torch.int64).max      # a code no interval contains / no key equals


@dataclasses.dataclass
class MaskCodes:
    """``[b, S]`` int64 codes; ``key_clean`` = doc * 2**31 + block, ``key_noisy`` = doc * 2**31 +
    (block << 2 | copy) (or +-_NEVER).

    Query q may attend key k iff ``low[q] <= key_clean[k] <= high[q]`` (a clean key of the same
    document, block <= block(q) for a clean query, < for a noisy one) or ``key_noisy[k] ==
    same_block[q]`` (a noisy key in the noisy query's own block, copy and document).
    """

    key_clean: torch.Tensor
    key_noisy: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    same_block: torch.Tensor

    def tensors(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def mask_codes(layout: AttentionLayout) -> MaskCodes:
    doc_base = layout.doc.long() * _DOC_STRIDE
    code = doc_base + layout.block.long()
    clean = layout.clean
    noisy_code = doc_base + (layout.block.long() << _COPY_BITS) + layout.copy.long()
    never = torch.full_like(code, _NEVER)
    return MaskCodes(key_clean=torch.where(clean, code, never), key_noisy=torch.where(clean, -never, noisy_code),
                     low=doc_base, high=code - (~clean).long(), same_block=torch.where(clean, never, noisy_code))


def allowed_from_codes(codes: MaskCodes, start: int, stop: int) -> torch.Tensor:
    """Bool ``[b, 1, stop-start, S]``, equal to ``allowed_rows(layout, start, stop)``."""
    q = lambda t: t[:, start:stop, None]  # noqa: E731  [b, q, 1]
    k = lambda t: t[:, None, :]           # noqa: E731  [b, 1, S]
    key_clean = k(codes.key_clean)
    allowed = (key_clean >= q(codes.low)) & (key_clean <= q(codes.high))
    allowed |= k(codes.key_noisy) == q(codes.same_block)
    return allowed.unsqueeze(1)
