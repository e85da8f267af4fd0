"""Runners from what a user has on disk: an HF folder (reference model) or a megatron checkpoint."""

from __future__ import annotations

import os
from typing import Dict

import torch

from megatron_uni.convert.hf_io import CONFIG_FILE, HFCheckpoint, read_json


def read_hf_weights(folder: str) -> Dict[str, torch.Tensor]:
    return HFCheckpoint(folder).read_all()


def hf_runner(folder: str, cached: bool = True, dtype: torch.dtype = torch.float32):
    """The reference model on an HF LLaDA2 folder, with (default) or without the KV cache."""
    from megatron_uni.inference.reference_runner import CachedReferenceRunner, uncached_reference_runner

    config = read_json(os.path.join(folder, CONFIG_FILE))
    weights = read_hf_weights(folder)
    return (CachedReferenceRunner if cached else uncached_reference_runner)(weights, config, dtype)


def is_megatron_checkpoint(path: str) -> bool:
    from megatron_uni.checkpoint import LATEST, METADATA

    return os.path.isfile(os.path.join(path, METADATA)) or os.path.isfile(os.path.join(path, LATEST))
