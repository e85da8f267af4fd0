"""Time the MoE experts: megatron-core's SequentialMLP vs our grouped-GEMM experts (model/experts.py).

Builds one model from a recipe (single process) with ``model.expert_impl=sequential`` and one
with ``grouped`` (same weights), and times forward+backward of the whole model on random tokens.
On CPU both run a per-expert matmul loop, so equal times are the expectation; the grouped path's
``torch._grouped_mm`` only runs on CUDA in bf16.

Example:
    python tools/bench_experts.py --tokens 2048 model.num_experts=64 model.moe_router_num_groups=8
"""

from __future__ import annotations

import argparse
import os
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="model overrides, e.g. model.num_experts=64")
    parser.add_argument("--recipe", default=os.path.join(REPO, "recipes", "model", "tiny.yaml"))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (one row)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def _step(model, ids, positions, mask):
    model.zero_grad(set_to_none=True)
    model(ids, positions, mask, labels=ids).float().mean().backward()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_uni.config import load_config
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import init_single_process

    init_single_process()
    models = {impl: build_model(load_config(args.recipe, [*args.overrides, f"model.expert_impl={impl}"]).model)
              for impl in ("sequential", "grouped")}
    models["grouped"].load_state_dict(models["sequential"].state_dict())
    cfg = load_config(args.recipe, args.overrides).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.text_vocab, (1, args.tokens), generator=gen)
    positions = torch.arange(args.tokens)[None]
    mask = torch.zeros(1, 1, args.tokens, args.tokens, dtype=torch.bool)  # full attention; experts are timed
    print(f"{cfg.num_experts} experts top-{cfg.moe_router_topk}, hidden {cfg.hidden_size}, expert ffn "
          f"{cfg.moe_ffn_hidden_size}, {cfg.num_layers} layers, {args.tokens} tokens, {torch.get_num_threads()} threads")
    for impl, model in models.items():
        _step(model, ids, positions, mask)  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            _step(model, ids, positions, mask)
        print(f"{impl:<11} fwd+bwd {(time.perf_counter() - start) / args.repeats * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
