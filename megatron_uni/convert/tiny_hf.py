"""A small random HF LLaDA2 folder for any ModelConfig: the input of conversion tests and demos.

Weights are drawn so the interesting paths are exercised: norms away from 1, router weights
large enough (and expert biases non-zero) that the expert bias changes which experts and groups
are chosen. Written in bf16 with the expert bias in fp32, split over several shards.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from megatron_uni.convert import mapping
from megatron_uni.convert.hf_config import uni_config
from megatron_uni.convert.hf_io import CONFIG_FILE, plan_shards, write_index, write_json, write_shard


def _draw(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if name.endswith("expert_bias"):
        return noise * 0.2
    if "norm" in name:
        return 1.0 + 0.1 * noise
    if name.endswith("mlp.gate.weight"):
        return noise * 0.5
    return noise * 0.05


def tiny_hf_weights(model_cfg, text_only: bool = True, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{hf name: tensor}``: bf16 weights, fp32 expert bias; vocab rows = text vocab if ``text_only``."""
    rows = model_cfg.text_vocab if text_only else model_cfg.vocab
    generator = torch.Generator().manual_seed(seed)
    weights: Dict[str, torch.Tensor] = {}
    for entry in mapping.entries(model_cfg, rows):
        for name, shape in entry.hf_shapes().items():
            tensor = _draw(name, shape, generator)
            weights[name] = tensor.float() if entry.keep_fp32 else tensor.to(torch.bfloat16)
    return weights


def write_tiny_hf(folder: str, model_cfg, text_only: bool = True, seed: int = 0, shards: int = 3) -> Dict[str, torch.Tensor]:
    """Write the folder (safetensors shards + index + config.json); returns the weights."""
    os.makedirs(folder, exist_ok=True)
    weights = tiny_hf_weights(model_cfg, text_only, seed)
    sizes = [(n, t.numel() * t.element_size()) for n, t in weights.items()]
    bound = sum(s for _, s in sizes) // shards + 1
    plans = plan_shards(sizes, bound)
    for plan in plans:
        write_shard(folder, plan, weights)
    write_index(folder, plans)
    config = uni_config(model_cfg, pad_token_id=None)
    if text_only:  # an LLaDA2.0-mini style config: text vocabulary, no image offset
        config["vocab_size"] = model_cfg.text_vocab
        config.pop("image_token_offset")
    write_json(os.path.join(folder, CONFIG_FILE), config)
    return weights
