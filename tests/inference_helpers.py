"""Shared pieces of the inference tests: the tiny model's vocabulary and weights, a fake runner."""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def one_thread():
    """The reference model runs many small ops: extra threads only contend on shared CI cores
    (10x slower with 2 threads on a loaded 2-core machine). Restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# as in convert_helpers: 4 experts per group, top-4 of 2 kept groups, so megatron's group score
# (sum of the topk / group_topk = 2 best of a group) equals HF LLaDA2's (sum of the 2 best)
PARITY_OVERRIDES = ["model.num_experts=16", "model.moe_router_topk=4", "model.moe_router_num_groups=4",
                    "model.moe_router_group_topk=2"]


def tiny_model_config(overrides=()):
    from megatron_uni.config import load_config

    return load_config(os.path.join(REPO, "recipes", "model", "tiny.yaml"), list(overrides)).model


def demo_vocabulary(folder: str):
    """The demo BPE tokenizer (1024 text ids) + the tiny model's 256 image codes."""
    from megatron_uni.data.demo import build_demo_tokenizer
    from megatron_uni.tokens import Vocabulary

    m = tiny_model_config()
    build_demo_tokenizer(["a blue square in the top left", "a red circle below"] * 4).save(
        os.path.join(folder, "tokenizer.json"))
    return Vocabulary.from_tokenizer_dir(folder, text_size=m.text_vocab, num_image_codes=m.num_image_codes)


def tiny_weights(seed: int = 1) -> Tuple[Dict[str, torch.Tensor], dict]:
    """HF weights (text + image rows) and config.json of the tiny model."""
    from megatron_uni.convert.hf_config import uni_config
    from megatron_uni.convert.tiny_hf import tiny_hf_weights

    m = tiny_model_config()
    return tiny_hf_weights(m, text_only=False, seed=seed), uni_config(m, pad_token_id=None)


class FakeRunner:
    """Logits chosen by the test: position ``c`` (canvas column) proposes token ``token(c)``
    with the probability ``confidence(call, c)``; records every forward and commit."""

    def __init__(self, vocab_size: int, confidence, token=lambda column: 100 + column % 50,
                 max_length: int = 4096) -> None:
        self.vocab_size, self.max_length, self.forwards = vocab_size, max_length, 0
        self.confidence, self.token = confidence, token
        self.calls: List[Tuple[str, int, int]] = []  # (kind, first column, count)
        self.committed: List[torch.Tensor] = []

    def new_cache(self, rows: int, block_size: int) -> dict:
        return {"length": 0}

    def commit(self, cache, tokens, positions, valid=None) -> None:
        self.calls.append(("commit", cache["length"], tokens.shape[1]))
        self.committed.append(tokens.clone())
        cache["length"] += tokens.shape[1]
        self.forwards += 1

    def forward(self, cache, tokens, positions) -> torch.Tensor:
        start, n = cache["length"], tokens.shape[1]
        call = sum(1 for kind, _, _ in self.calls if kind == "forward")
        self.calls.append(("forward", start, n))
        self.forwards += 1
        logits = torch.full((tokens.shape[0], n, self.vocab_size), -1e4)
        for i in range(n):
            p = float(self.confidence(call, start + i))
            logits[:, i] = torch.log(torch.tensor((1 - p) / (self.vocab_size - 1)))
            logits[:, i, self.token(start + i)] = torch.log(torch.tensor(p))
        return logits
