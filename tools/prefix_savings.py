"""Print the token saving of the prefix-aware BDLM layout on SFT- and understanding-shaped samples.

Example:
    python tools/prefix_savings.py --samples 200 --block-size 32
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from megatron_uni.config import DiffusionConfig
from megatron_uni.diffusion.savings import SHAPES, measure
from megatron_uni.tokens import Vocabulary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="samples drawn per format (default 200)")
    parser.add_argument("--block-size", type=int, default=32, help="BDLM block size (default 32)")
    parser.add_argument("--t-min", type=float, default=0.3, help="lowest mask ratio (default 0.3)")
    parser.add_argument("--t-max", type=float, default=0.8, help="highest mask ratio (default 0.8)")
    parser.add_argument("--formats", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        help="sample formats to measure")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    vocab = Vocabulary.synthetic(text_size=157184, num_image_codes=16384)
    cfg = DiffusionConfig(t_min=args.t_min, t_max=args.t_max)
    print(f"{'format':<14} {'samples':>8} {'full 2L tokens':>15} {'prefix-aware':>13} {'saving':>7}")
    for name in tqdm(args.formats, desc="formats", disable=len(args.formats) < 2):
        shape = SHAPES[name]
        result = measure(shape, args.samples, cfg, args.block_size, vocab, args.seed)
        tqdm.write(f"{name:<14} {result['samples']:>8} {result['full_tokens']:>15} "
              f"{result['prefix_aware_tokens']:>13} {result['saving']:>7.1%}")
        tqdm.write(f"  shape: prompt text {shape.prompt_text}, prompt image codes {shape.prompt_image}, "
              f"target {shape.target} tokens (uniform)")


if __name__ == "__main__":
    main()
