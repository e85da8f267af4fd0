#!/usr/bin/env python
"""Tokenize task-format JSONL files into one megatron-core IndexedDataset (PREFIX.bin / PREFIX.idx).

Example (demo data):
    python tools/build_dataset.py --input demo/samples.jsonl --tokenizer demo/tokenizer \
        --image-codes demo/image_codes.json --num-image-codes 256 --output demo/dataset/demo --workers 2

Bad samples are skipped, counted per field, and listed (file:line: field: reason) in
PREFIX.errors.txt; PREFIX.build.json records the counts and settings. The pair is published as one
unit (PREFIX.seal.json); a build that keeps no sample exits 2 and leaves an existing PREFIX as it
was. Refusals and recovery: docs/errors.md.
"""

import argparse
import sys

from tqdm import tqdm

from megatron_uni.data.build import BuildSettings, build_dataset
from megatron_uni.data.packing import PackingSettings, pack
from megatron_uni.errors import one_line_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="task-format JSONL file(s), read in order")
    p.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin, PREFIX.idx)")
    p.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json "
                   "(and optionally special_tokens.json overriding special-token strings)")
    p.add_argument("--image-codes", default=None,
                   help="image codes: a directory written by tools/tokenize_images.py, or the demo's "
                        "image_codes.json fallback; omit for text-only data")
    p.add_argument("--text-size", type=int, default=None,
                   help="model text vocabulary (image_offset); default: the tokenizer size")
    p.add_argument("--num-image-codes", type=int, default=16384, help="image codebook size (tiny demo: 256)")
    p.add_argument("--cfg-dropout", type=float, default=0.1,
                   help="probability that a text-to-image/editing prompt becomes <uncondition>")
    p.add_argument("--seed", type=int, default=1234, help="seed of the per-sample CFG dropout draws")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--seq-length", type=int, default=None,
                   help="also report packing efficiency for this row length (and --block-size)")
    p.add_argument("--max-length", type=int, default=None,
                   help="skip (by name, in PREFIX.errors.txt) samples longer than this many tokens; "
                        "default 2 x --seq-length when that is given, else no limit")
    p.add_argument("--block-size", type=int, default=32, help="diffusion block size for the packing report")
    p.add_argument("--lookahead", type=int, default=1,
                   help="packing report: fill each row with the first fitting of the next N samples")
    return p.parse_args(argv)


@one_line_errors("build_dataset")
def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0.0 <= args.cfg_dropout <= 1.0:
        raise SystemExit(f"--cfg-dropout must lie in [0, 1], got {args.cfg_dropout}")
    max_length = args.max_length or (2 * args.seq_length if args.seq_length else None)
    settings = BuildSettings(tokenizer_dir=args.tokenizer, image_codes=args.image_codes, text_size=args.text_size,
                             num_image_codes=args.num_image_codes, cfg_dropout=args.cfg_dropout, seed=args.seed,
                             max_length=max_length)
    report = build_dataset(args.input, args.output, settings, workers=args.workers,
                           progress=lambda it: tqdm(it, desc="samples", unit="sample"))
    print(f"wrote {report.written} samples ({report.tokens} tokens) to {args.output}.bin/.idx; "
          f"{report.bad_total} bad samples" + (f" by field {report.bad}, listed in {args.output}.errors.txt"
                                               if report.bad_total else ""))
    if args.seq_length:
        print("packing (one pass, no split):",
              packing_report(args.output, args.seq_length, args.block_size, args.lookahead))
    return 0


def packing_report(prefix: str, seq_length: int, block_size: int, lookahead: int = 1) -> str:
    from megatron_uni.data.storage import SampleDataset

    lengths = SampleDataset(prefix).lengths
    return pack(lengths, PackingSettings(seq_length, block_size, lookahead=lookahead)).stats.summary()


if __name__ == "__main__":
    sys.exit(main())
