"""The LLaDA2.0-Uni backbone: megatron-core's ``GPTModel`` with RoPE taken from ``position_ids``.

megatron-core 0.16.1 ignores ``position_ids`` under ``position_embedding_type="rope"``: it
rotates by the row index 0..s-1 (``GPTModel._preprocess``). The BDLM layout needs the ids:
both copies of ``[noisy | clean]`` carry positions 0..L-1 (a noisy query and the clean key of
the same token must be at relative distance 0, as in the HF model), packed documents restart at
0, and the prefix-aware layout drops positions. :class:`UniGPTModel` replaces the rotary table
by one computed per (sample, position) from ``position_ids``: shape ``[s, b, 1, d]``, which
megatron's unfused ``apply_rotary_pos_emb`` broadcasts over heads. It requires
``apply_rope_fusion=False`` (TE's fused RoPE takes one table for the whole batch). Everything
else, checkpoint keys included, is ``GPTModel``'s own.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


def rope_table(rotary, position_ids: torch.Tensor) -> torch.Tensor:
    """``[s, b, 1, d]`` angles of megatron's ``RotaryEmbedding`` ``rotary`` at ``position_ids`` ``[b, s]``."""
    inv_freq = rotary.inv_freq.to(position_ids.device)
    positions = position_ids.to(inv_freq.dtype)
    if rotary.seq_len_interpolation_factor is not None:
        positions = positions / rotary.seq_len_interpolation_factor
    freqs = positions.transpose(0, 1).unsqueeze(-1) * inv_freq  # [s, b, d/2]
    if rotary.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.unsqueeze(2)


class UniGPTModel(GPTModel):
    """``GPTModel`` (rope) whose rotary angles follow ``position_ids`` per sample."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.position_embedding_type != "rope":
            raise ValueError(f"UniGPTModel: position_embedding_type={self.position_embedding_type!r}, needs 'rope'")
        if getattr(self.config, "apply_rope_fusion", False):
            raise ValueError("UniGPTModel needs apply_rope_fusion=False (fused RoPE takes one table for the "
                             "whole batch, not one per sample)")
        if self.config.context_parallel_size > 1:
            raise ValueError("UniGPTModel: context parallelism is not supported (RoPE from position_ids)")

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        output = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if output[1] is None or position_ids is None:  # no rotary table here (a later PP stage)
            return output
        return (output[0], rope_table(self.rotary_pos_emb, position_ids)) + tuple(output[2:])
