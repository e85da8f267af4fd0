"""The block-diffusion mask as an additive attention bias, for kernels that take a bias and not a
mask rule (TransformerEngine's fused cuDNN attention: ``core_attention_bias_type="post_scale_bias"``).

Same rule as ``masks.py`` (built from :func:`~megatron_uni.attention.masks.allowed_rows`): 0 where
the query may attend the key, ``-inf`` where it may not, shape ``[b, 1, S, S]`` (broadcast over
heads). Dense: ``b * S^2`` elements (512 MiB per row in BF16 at 2L = 16384), built once per
micro-batch and shared by every layer through :class:`BiasCache`. Every query may attend itself
under the rule, so no softmax row is all ``-inf``.
"""

from __future__ import annotations

import collections

import torch

from megatron_uni.attention.layout import AttentionLayout
from megatron_uni.attention.masks import allowed_rows

MASKED = float("-inf")


def additive_bias(layout: AttentionLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[b, 1, S, S]`` of ``dtype``: 0 where allowed, -inf where masked out."""
    allowed = allowed_rows(layout)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, MASKED)


class BiasCache:
    """One bias per (layout descriptor tensor, dtype), reused by every layer of a micro-batch.

    Keyed like ``masks.BlockMaskCache``: storage pointer, shape, version counter and device of
    the descriptor, whose reference the entry keeps (so the storage cannot be reused by another
    batch while the entry lives). Few entries: each is a dense ``[b, 1, S, S]`` tensor.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self.entries: "collections.OrderedDict" = collections.OrderedDict()
        self.builds = 0

    def get(self, descriptor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (descriptor.data_ptr(), tuple(descriptor.shape), descriptor._version, str(descriptor.device), dtype)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][1]
        bias = additive_bias(AttentionLayout.from_descriptor(descriptor), dtype)
        self.builds += 1
        self.entries[key] = (descriptor, bias)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return bias
