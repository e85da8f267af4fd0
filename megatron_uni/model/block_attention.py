"""Block-diffusion core attention: a drop-in ``core_attention`` submodule for megatron-core.

Same constructor and forward signature as
``megatron.core.transformer.dot_product_attention.DotProductAttention``. ``attention_mask`` is
either

* the attention-layout descriptor (int32 ``[b, 3, S]``, ``megatron_uni.attention.layout``):
  on GPU a compiled FlexAttention call with a ``BlockMask`` built once per descriptor and
  reused by every layer; on CPU SDPA over chunks of queries with the bool mask of the chunk
  only, rebuilt in backward instead of saved (memory O(chunk x S) instead of O(S^2), in
  training too); or
* a bool mask broadcastable to ``[b, 1, S, S]`` (True = masked out): SDPA with that mask.

Tensor parallel: the module sees only its local heads (query ``[s, b, heads/TP, d]``), which
is all attention needs. Sequence parallel: the QKV projection has already gathered the full
sequence, so nothing changes. Context parallel would split the sequence and is refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_uni.attention.layout import AttentionLayout, is_descriptor
from megatron_uni.attention.masks import BlockMaskCache, MaskCodes, allowed_from_codes, mask_codes

# queries per SDPA call in the CPU fallback
CPU_QUERY_CHUNK = 1024
# device types that take the FlexAttention path (CPU has no FlexAttention backward in torch 2.13;
# tests add "cpu" to run the path forward-only)
FLEX_DEVICE_TYPES = ("cuda",)

_MASK_CACHE = BlockMaskCache()
_COMPILED_FLEX = None


def _compiled_flex_attention():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # default dynamic=None: after a second sequence length (compacted rows vary) torch
        # recompiles once with dynamic shapes instead of hitting the recompile limit and
        # silently falling back to the unfused, O(S^2)-memory eager path
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def mask_cache() -> BlockMaskCache:
    """The process-wide BlockMask cache shared by all layers."""
    return _MASK_CACHE


class BlockDiffusionAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                f"BlockDiffusionAttention does not support context parallelism (context_parallel_size="
                f"{config.context_parallel_size}): the block-diffusion mask would need a zig-zag split of "
                "the [noisy | clean] layout. Use context_parallel_size=1.")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"BlockDiffusionAttention: attention_dropout={dropout} is not supported "
                             "(FlexAttention has no dropout; LLaDA2 trains without it). Set it to 0.")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise ValueError("BlockDiffusionAttention: apply_query_key_layer_scaling is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("BlockDiffusionAttention: packed_seq_params / attention_bias are not supported; "
                             "documents are separated by the layout descriptor instead")
        if attention_mask is None:
            raise ValueError("BlockDiffusionAttention needs an attention_mask: a layout descriptor "
                             "(DiffusionInputs.attention_mask) or a bool [b,1,S,S] mask")
        # megatron layout [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if is_descriptor(attention_mask):
            _check_length(attention_mask.shape[-1], q.shape[2])
            out = self._layout_attention(q, k, v, attention_mask)
        else:
            out = self._dense_attention(q, k, v, attention_mask)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _layout_attention(self, q, k, v, descriptor):
        if q.device.type in FLEX_DEVICE_TYPES:
            flex = _compiled_flex_attention()
            return flex(q, k, v, block_mask=_MASK_CACHE.get(descriptor), scale=self.softmax_scale,
                        enable_gqa=q.shape[1] != k.shape[1])
        return chunked_sdpa(q, k, v, AttentionLayout.from_descriptor(descriptor), self.softmax_scale)

    def _dense_attention(self, q, k, v, masked_out):
        if masked_out.dtype != torch.bool:
            raise ValueError(f"BlockDiffusionAttention: a dense attention_mask must be bool (True = masked out), "
                             f"got {masked_out.dtype} {tuple(masked_out.shape)}")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~masked_out, scale=self.softmax_scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


def _check_length(layout_length: int, seq_length: int) -> None:
    if layout_length != seq_length:
        raise ValueError(f"BlockDiffusionAttention: layout descriptor covers {layout_length} positions but the "
                         f"sequence has {seq_length}")


def chunked_sdpa(q, k, v, layout: AttentionLayout, scale: float, chunk: Optional[int] = None):
    """SDPA over query chunks, each with its own ``[b, 1, chunk, S]`` bool mask from the layout.

    Memory O(chunk x S) with and without gradients: nothing mask-sized is saved for backward,
    which recomputes each chunk's mask and attention (:class:`_ChunkedAttention`).
    ``chunk`` defaults to the module's ``CPU_QUERY_CHUNK`` read at call time.
    """
    chunk = chunk or CPU_QUERY_CHUNK
    return _ChunkedAttention.apply(q, k, v, scale, chunk, *mask_codes(layout).tensors())


def _chunks(length: int, chunk: int):
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def _sdpa(q, k, v, allowed, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class _ChunkedAttention(torch.autograd.Function):
    """Chunked masked SDPA that saves only q, k, v and the O(S) mask codes for backward.

    Plain autograd over SDPA calls would keep every chunk's mask (as float, b*S^2*4 bytes over
    the chunks: as much as one dense mask) until backward. Backward here rebuilds one chunk's
    mask at a time and differentiates that chunk's SDPA (one extra attention forward per step).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, chunk, *code_tensors):
        codes = MaskCodes(*code_tensors)
        out = torch.empty_like(q)
        for start, stop in _chunks(q.shape[2], chunk):
            out[:, :, start:stop] = _sdpa(q[:, :, start:stop], k, v, allowed_from_codes(codes, start, stop), scale)
        ctx.save_for_backward(q, k, v, *code_tensors)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *code_tensors = ctx.saved_tensors
        codes = MaskCodes(*code_tensors)
        grad_q = torch.empty_like(q)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        keys, values = k.detach().requires_grad_(), v.detach().requires_grad_()
        with torch.enable_grad():
            for start, stop in _chunks(q.shape[2], ctx.chunk):
                queries = q[:, :, start:stop].detach().requires_grad_()
                out = _sdpa(queries, keys, values, allowed_from_codes(codes, start, stop), ctx.scale)
                dq, dk, dv = torch.autograd.grad(out, (queries, keys, values), grad_out[:, :, start:stop])
                grad_q[:, :, start:stop] = dq
                grad_k += dk
                grad_v += dv
        return (grad_q, grad_k, grad_v, None, None) + (None,) * len(code_tensors)


def block_attention_spec():
    """``ModuleSpec`` for ``build_model(..., core_attention=block_attention_spec())``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=BlockDiffusionAttention)
