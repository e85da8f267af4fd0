#!/usr/bin/env python
"""Generate the demo dataset: drawn shapes with captions, editing pairs, grounding boxes, chats and
plain text as task-format JSONL, a tokenizer.json with a text vocabulary of exactly 1024, and
fallback image codes (image_codes.json). Takes a few seconds.

    python tools/make_demo_data.py --output demo
    python tools/build_dataset.py --input demo/samples.jsonl --tokenizer demo/tokenizer \
        --image-codes demo/image_codes.json --num-image-codes 256 --output demo/dataset/demo
"""

import argparse
import sys

from tqdm import tqdm

from megatron_uni.data.demo import make_demo_data
from megatron_uni.errors import one_line_errors


@one_line_errors("make_demo_data")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="directory to write (created if missing)")
    p.add_argument("--scenes", type=int, default=48, help="number of drawn scenes")
    p.add_argument("--paragraphs", type=int, default=64, help="number of plain-text samples")
    p.add_argument("--seed", type=int, default=0, help="the output is a pure function of the seed")
    args = p.parse_args(argv)
    counts = make_demo_data(args.output, num_scenes=args.scenes, num_paragraphs=args.paragraphs, seed=args.seed,
                            progress=lambda it: tqdm(it, desc="scenes", unit="scene"))
    print(f"wrote {sum(counts.values())} samples to {args.output}/samples.jsonl: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
