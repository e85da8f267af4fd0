#!/usr/bin/env python
"""Sampler throughput: tokens/s and tokens per forward, with and without the prefix KV cache.

    python tools/bench_generate.py                         # tiny recipe, random weights, CPU
    python tools/bench_generate.py --hf HF_FOLDER --prompt-length 1024 --length 256
    python tools/bench_generate.py --checkpoint CKPT     # our megatron model, one CPU process

Greedy text generation of exactly --length positions (EOS ignored) after a random prompt of
--prompt-length text ids, by the reference model (or, with --checkpoint, our megatron model)
with the cache and by the same model recomputing the prefix every step. Both must produce the
same tokens (checked). Prints one JSON line per mode and the speed-up; --json appends them to a
file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", help="HF LLaDA2 folder (default: random weights of --recipe)")
    parser.add_argument("--checkpoint", help="megatron checkpoint root / iter_* directory instead of --hf")
    parser.add_argument("--recipe", default=os.path.join(REPO, "recipes", "model", "tiny.yaml"),
                        help="model recipe for random weights (default: the tiny model)")
    parser.add_argument("--prompt-length", type=int, default=1024)
    parser.add_argument("--length", type=int, default=256, help="positions to generate")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--modes", default="cached,uncached", help="comma list of cached, uncached")
    parser.add_argument("--json", help="append the result lines to this file")
    return parser.parse_args(argv)


def _weights(args):
    from megatron_uni.convert.hf_io import CONFIG_FILE, read_json

    if args.hf:
        from megatron_uni.inference.loading import read_hf_weights

        return read_hf_weights(args.hf), read_json(os.path.join(args.hf, CONFIG_FILE))
    from megatron_uni.config import load_config
    from megatron_uni.convert.hf_config import uni_config
    from megatron_uni.convert.tiny_hf import tiny_hf_weights

    model_cfg = load_config(args.recipe).model
    return tiny_hf_weights(model_cfg, text_only=False, seed=0), uni_config(model_cfg, pad_token_id=None)


def _runner_makers(args):
    """(text vocabulary, image codes, {mode: () -> runner}) of the model under test."""
    if args.checkpoint:
        from megatron_uni.inference.megatron_runner import load_megatron_model, megatron_runner

        model, model_cfg = load_megatron_model(args.checkpoint)
        return model_cfg.text_vocab, model_cfg.num_image_codes, {
            "cached": lambda: megatron_runner(model, model_cfg, cached=True),
            "uncached": lambda: megatron_runner(model, model_cfg, cached=False)}
    from megatron_uni.inference.reference_runner import CachedReferenceRunner, uncached_reference_runner

    weights, config = _weights(args)
    text = int(config.get("image_token_offset") or config["vocab_size"])
    return text, max(1, int(config["vocab_size"]) - text), {
        "cached": lambda: CachedReferenceRunner(weights, config),
        "uncached": lambda: uncached_reference_runner(weights, config)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_uni.inference import GenerationRequest, SamplerSettings, generate
    from megatron_uni.tokens import Vocabulary

    if args.threads:
        torch.set_num_threads(args.threads)
    text, codes, makers = _runner_makers(args)
    vocabulary = Vocabulary.synthetic(text, codes)
    generator = torch.Generator().manual_seed(0)
    low_ids = min(vocabulary.special_ids.values())  # random prompt text below every special id
    prompt = torch.randint(0, low_ids, (args.prompt_length,), generator=generator).tolist()
    request = GenerationRequest([prompt], args.length, stop_at_eos=False)
    settings = SamplerSettings(args.block_size, args.steps, args.threshold)
    results, tokens = {}, {}
    for mode in args.modes.split(","):
        runner = makers[mode]()
        started = time.perf_counter()
        out = generate(runner, vocabulary, request, settings)
        seconds = time.perf_counter() - started
        tokens[mode] = out.tokens
        results[mode] = {"mode": mode, "prompt_length": args.prompt_length, "generated": len(out.tokens),
                         "block_size": args.block_size, "steps": args.steps, "threshold": args.threshold,
                         "seconds": round(seconds, 3), "tokens_per_s": round(len(out.tokens) / seconds, 2),
                         "refinement_forwards": out.refinement_forwards, "model_forwards": out.model_forwards,
                         "tokens_per_forward": round(out.tokens_per_forward, 3),
                         "threads": torch.get_num_threads(),
                         "model": args.checkpoint or args.hf or os.path.basename(args.recipe),
                         "runner": "megatron" if args.checkpoint else "reference"}
        print(json.dumps(results[mode]), flush=True)
    if len(tokens) == 2:
        same = tokens["cached"] == tokens["uncached"]
        speedup = results["uncached"]["seconds"] / results["cached"]["seconds"]
        print(f"cached vs uncached: same tokens {same}; speed-up {speedup:.2f}x")
        if not same:
            return 1
    if args.json:
        with open(args.json, "a") as f:
            for line in results.values():
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
