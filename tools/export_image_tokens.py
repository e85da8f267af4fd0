#!/usr/bin/env python
"""Turn sampler output into image-token grids for the LLaDA2.0-Uni diffusion decoder.

    python tools/export_image_tokens.py samples.jsonl images.jsonl --tokenizer TOKENIZER_DIR

Input lines: {"prompt", "tokens": generated ids with image blocks} or {"prompt", "grid": [H, W],
"image_tokens": H*W ids}. Output lines: {"id", "index", "prompt", "h", "w", "token_ids":
0-based VQ codes row-major, "metadata"}; feed each to decoder/decode.py::decode_vq_tokens(
token_ids, h, w, model_path). See docs/conversion.md for the full format.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_uni.config import load_config
from megatron_uni.errors import one_line_errors

# the released model's vocabulary sizes
DEFAULTS = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "recipes", "model", "llada2_uni_16b.yaml")).model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="sampler output, JSON Lines")
    parser.add_argument("output", help="decoder input to write, JSON Lines (one image per line)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json) of the model")
    parser.add_argument("--text-vocab", type=int, default=DEFAULTS.text_vocab,
                        help="model text vocabulary = image token offset (default %(default)s)")
    parser.add_argument("--num-image-codes", type=int, default=DEFAULTS.num_image_codes,
                        help="VQ codebook size (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@one_line_errors("export_image_tokens")
def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_uni.convert.image_tokens import export_image_tokens
    from megatron_uni.tokens import Vocabulary

    vocabulary = Vocabulary.from_tokenizer_dir(args.tokenizer, text_size=args.text_vocab,
                                               num_image_codes=args.num_image_codes)
    count = export_image_tokens(args.input, args.output, vocabulary, progress=not args.no_progress)
    print(f"wrote {count} image(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
