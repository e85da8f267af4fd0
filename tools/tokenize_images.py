#!/usr/bin/env python
"""Tokenize images offline with the SigLIP-VQ encoder into an image-code store.

Single process:   python tools/tokenize_images.py --input manifest.jsonl --output codes/ --tiny
Several ranks:    mpirun -n 8 python tools/tokenize_images.py ...   (or srun --mpi=pmi2 ...)
Rerunning the same command resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_uni.errors import one_line_errors
from megatron_uni.vq.images import GENERATION_TARGETS, MODES
from megatron_uni.vq.job import JobSpec, run_job


def parse_args(argv=None) -> JobSpec:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSONL manifests (fields 'image' or 'images', optional 'key'), WebDataset .tar "
                             "shards and/or directories of images")
    parser.add_argument("--key-style", choices=("path", "stem"), default="path",
                        help="store key of a manifest/directory image: its path as written, or its file stem")
    parser.add_argument("--output", required=True, help="store directory (shards/, index.json, report.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="HF image_tokenizer/ directory (config.json + safetensors)")
    source.add_argument("--tiny", action="store_true", help="tiny seeded random encoder (tests, demo)")
    parser.add_argument("--tiny-seed", type=int, default=0, help="seed of the --tiny encoder")
    parser.add_argument("--tiny-codes", type=int, default=256, help="codebook size of the --tiny encoder")
    parser.add_argument("--mode", choices=MODES, default="understanding", help="resolution rule")
    parser.add_argument("--generation-size", type=int, choices=GENERATION_TARGETS,
                        help="target px of generated images (mode generation); grid = size/2/16")
    parser.add_argument("--multi-image", action="store_true",
                        help="understanding budget for samples with several images (448^2 max)")
    parser.add_argument("--min-side", type=int, default=32, help="images with a smaller side are reported as too_small")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard (unit of resume)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per decode/encode batch")
    parser.add_argument("--decoder", choices=("auto", "dali", "pil"), default="auto",
                        help="auto = NVIDIA DALI if installed, else PIL")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads per rank")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.mode == "generation" and args.generation_size is None:
        parser.error("--mode generation needs --generation-size")
    return JobSpec(inputs=args.input, output=args.output, mode=args.mode, generation_target=args.generation_size,
                   multi_image=args.multi_image, min_side=args.min_side, shard_size=args.shard_size,
                   batch_size=args.batch_size, decoder=args.decoder, device=args.device, encoder_dir=args.encoder,
                   tiny=args.tiny, tiny_seed=args.tiny_seed, tiny_codes=args.tiny_codes,
                   key_style=args.key_style, threads=args.threads,
                   progress=not args.no_progress)


@one_line_errors("tokenize_images")
def main(argv=None) -> int:
    result = run_job(parse_args(argv))
    if result["this_rank"] == 0:  # one summary line for the whole job, per-rank counts inside
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
