"""The block-diffusion mask as an additive attention bias, for kernels that take a bias and not a
mask rule (TransformerEngine's fused cuDNN attention: ``core_attention_bias_type="post_scale_bias"``).

Same rule as ``masks.py`` (built from :func:`~megatron_uni.attention.masks.allowed_rows`): 0 where
the query may attend the key, ``-inf`` (or a large finite negative) where it may not, shape ``[b, 1, S, S]`` (broadcast over
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


def finite_masked_value(dtype: torch.dtype) -> float:
    """A large finite negative for kernels that want no -inf in a bias: TransformerEngine's own
    arbitrary-mask-to-post-scale-bias example uses -2**50 (bf16, fp32) and -2**15 (fp16)."""
    return -(2.0 ** 15) if dtype == torch.float16 else -(2.0 ** 50)


def additive_bias(layout: AttentionLayout, dtype: torch.dtype = torch.float32,
                  masked_value: float = MASKED) -> torch.Tensor:
    """``[b, 1, S, S]`` of ``dtype``: 0 where allowed, ``masked_value`` (-inf) where masked out."""
    allowed = allowed_rows(layout)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, masked_value)


class BiasCache:
    """One bias per (layout descriptor tensor, dtype), reused by every layer of a micro-batch.

    Keyed like ``masks.BlockMaskCache``: storage pointer, shape, version counter and device of
    the descriptor, whose reference the entry keeps (so the storage cannot be reused by another
    batch while the entry lives). Few entries: each is a dense ``[b, 1, S, S]`` tensor.
    """

    def __init__(self, size: int = 2, finite: bool = False):
        self.size, self.finite = size, finite   # finite: finite_masked_value instead of -inf
        self.entries: "collections.OrderedDict" = collections.OrderedDict()
        self.builds = 0

    def get(self, descriptor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (descriptor.data_ptr(), tuple(descriptor.shape), descriptor._version, str(descriptor.device), dtype)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][1]
        masked = finite_masked_value(dtype) if self.finite else MASKED
        bias = additive_bias(AttentionLayout.from_descriptor(descriptor), dtype, masked)
        self.builds += 1
        self.entries[key] = (descriptor, bias)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return bias
