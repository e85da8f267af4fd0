"""The second GPU attention backend: TransformerEngine's fused (cuDNN) attention with the
block-diffusion mask as an additive bias (``model.attention_backend: te_fused``).

megatron-core 0.16.1's ``TEDotProductAttention`` forwards ``attention_bias`` to TE as a
``post_scale_bias``. This subclass keeps our contract -- megatron hands it the layout
descriptor as ``attention_mask`` -- and turns the descriptor into that bias
(``attention/bias.py``; 0 / -2**50, finite as in TE's own example of an arbitrary mask as a
post-scale bias), once per micro-batch for all layers, then calls TE with no mask.
Built on first use because TE must import (GPU machines with the ``[te]`` extra). Parity with
the FlexAttention path: unmeasured (no GPU was lent to the session that wrote it).
"""

from __future__ import annotations

import functools

from megatron.core.transformer.enums import AttnMaskType

from megatron_uni.attention.bias import BiasCache
from megatron_uni.attention.layout import is_descriptor

# finite masked value, as in TE's own arbitrary-mask-to-post-scale-bias example
_BIAS_CACHE = BiasCache(finite=True)


def bias_cache() -> BiasCache:
    return _BIAS_CACHE


@functools.lru_cache(maxsize=None)
def te_fused_block_attention() -> type:
    """The ``core_attention`` class (a ``TEDotProductAttention`` taking the layout descriptor)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TEFusedBlockAttention(TEDotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            # the mask arrives as a bias: TE runs unmasked ("no_mask") plus post-scale bias
            super().__init__(config, layer_number, AttnMaskType.no_mask, attention_type, **kwargs)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if not is_descriptor(attention_mask) or attention_bias is not None or packed_seq_params is not None:
                raise ValueError("TEFusedBlockAttention needs the layout descriptor (DiffusionInputs.attention_mask) "
                                 "as attention_mask, and no attention_bias / packed_seq_params")
            if attention_mask.shape[-1] != query.shape[0]:
                raise ValueError(f"TEFusedBlockAttention: layout descriptor covers {attention_mask.shape[-1]} "
                                 f"positions but the sequence has {query.shape[0]}")
            bias = _BIAS_CACHE.get(attention_mask, query.dtype)
            return super().forward(query, key, value, None, attn_mask_type=AttnMaskType.no_mask,
                                   attention_bias=bias, **kwargs)

    return TEFusedBlockAttention
