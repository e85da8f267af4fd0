"""Kept for callers written before :class:`megatron_uni.model.gpt.UniGPTModel` declared RoPE from
``position_ids``: every model from ``build_model`` already rotates by them, so this only checks.
"""

from __future__ import annotations

from megatron_uni.model.gpt import UniGPTModel


def use_position_ids_for_rope(model) -> None:
    """Refuse a model chunk whose RoPE does not follow ``position_ids`` (one not built by ``build_model``)."""
    if not isinstance(model, UniGPTModel):
        raise ValueError(f"{type(model).__name__} rotates by row index; build the model with "
                         f"megatron_uni.model.builder.build_model (a UniGPTModel) to rotate by position_ids")
