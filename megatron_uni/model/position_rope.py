"""RoPE from ``position_ids`` for megatron-core's ``GPTModel``.

megatron-core 0.16.1 ignores ``position_ids`` under ``position_embedding_type="rope"``: it
rotates by the row index 0..s-1 (``GPTModel._preprocess``). The BDLM layout needs the ids:
both copies of ``[noisy | clean]`` carry positions 0..L-1 (a noisy query and the clean key of
the same token must be at relative distance 0, as in the HF model), packed documents restart at
0, and the prefix-aware layout drops positions. :func:`use_position_ids_for_rope` replaces the
rotary table of one model chunk by one computed per (sample, position) from ``position_ids``:
shape ``[s, b, 1, d]``, which megatron's unfused ``apply_rotary_pos_emb`` broadcasts over heads.
It requires ``apply_rope_fusion=False`` (TE's fused RoPE takes one table for the whole batch).
"""

from __future__ import annotations

import types

import torch


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


def use_position_ids_for_rope(model) -> None:
    """Make ``model`` (a megatron ``GPTModel`` chunk, rope) rotate by ``position_ids``. Idempotent."""
    if getattr(model, "_rope_from_position_ids", False):
        return
    if model.position_embedding_type != "rope":
        raise ValueError(f"use_position_ids_for_rope: model uses {model.position_embedding_type!r}, not 'rope'")
    if getattr(model.config, "apply_rope_fusion", False):
        raise ValueError("use_position_ids_for_rope needs apply_rope_fusion=False (fused RoPE takes one "
                         "table for the whole batch, not one per sample)")
    if model.config.context_parallel_size > 1:
        raise ValueError("use_position_ids_for_rope: context parallelism is not supported")
    original = model._preprocess

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        output = original(input_ids, position_ids, *args, **kwargs)
        if output[1] is None or position_ids is None:
            return output
        return (output[0], rope_table(self.rotary_pos_emb, position_ids)) + tuple(output[2:])

    model._preprocess = types.MethodType(_preprocess, model)
    model._rope_from_position_ids = True
