"""Shared pieces of the conversion tests: the tiny model, HF folder reading, spawned ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 16 experts in 4 groups of 4, keep 2 groups, top-4: the group score is then the sum of the
# 2 best experts of a group in megatron (topk / group_topk) exactly as in HF LLaDA2 (top-2).
# Text 1024 (the demo tokenizer) + 200 image codes = 1224, padded to 1280: 56 padding rows.
TINY_OVERRIDES = ["model.num_experts=16", "model.moe_router_topk=4", "model.moe_router_num_groups=4",
                  "model.moe_router_group_topk=2", "model.text_vocab=1024", "model.num_image_codes=200"]


def tiny_config():
    from megatron_uni.config import load_config

    return load_config(os.path.join(REPO, "recipes", "model", "tiny.yaml"), TINY_OVERRIDES)


def read_hf_folder(folder: str) -> Dict[str, torch.Tensor]:
    from megatron_uni.convert.hf_io import HFCheckpoint

    return HFCheckpoint(folder).read_all()


def run_tool(script: str, args: List[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", script), *args], capture_output=True,
                          text=True, env=env, timeout=240)


def batch(seed: int = 0, b: int = 2, s: int = 16, vocab: int = 1280):
    """Token ids over the whole vocabulary, positions, and a block-causal mask (True = masked out)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=generator)
    positions = torch.arange(s)[None].expand(b, s)
    block = torch.arange(s) // 4
    allowed = (block[None, :] <= block[:, None])[None, None].expand(b, 1, s, s)
    return ids, positions, ~allowed
