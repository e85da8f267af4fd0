#!/usr/bin/env python
"""Export a torch_dist checkpoint (saved at any TP/PP/EP layout) to an HF LLaDA2.0-Uni folder, on CPU.

    python tools/export_hf.py CKPT OUT_DIR --tokenizer TOKENIZER_DIR --base HF_UNI_DIR
    python tools/export_hf.py CKPT OUT_DIR --dry-run

CKPT is a checkpoint root (its 'latest' iteration is used) or an iter_NNNNNNN directory. The
output holds bf16 safetensors shards of at most --shard-size GiB + model.safetensors.index.json
(router expert bias kept fp32), config.json with every key the Uni inference code reads,
generation_config.json, the tokenizer files of --tokenizer, and image_tokenizer/ decoder/
decoder-turbo/ vae/ plus the remote-code .py files of --base (copied, or linked with --link).
The folder is written beside OUT_DIR and renamed into place at the end; a non-empty OUT_DIR is
refused unless --overwrite. Refusals and recovery: docs/errors.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_uni.errors import one_line_errors

DTYPES = ("bfloat16", "float32")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint root or iter_NNNNNNN directory")
    parser.add_argument("out_dir", help="HF folder to write")
    parser.add_argument("--tokenizer", help="directory with tokenizer.json (+ tokenizer_config.json ...) to copy")
    parser.add_argument("--base", help="HF LLaDA2.0-Uni folder to carry image_tokenizer/ decoder/ decoder-turbo/ "
                                       "vae/ and the remote-code files from")
    parser.add_argument("--link", action="store_true", help="symlink the carried folders instead of copying")
    parser.add_argument("--shard-size", type=float, default=5.0, help="max GiB per safetensors shard")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the exported weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT_DIR whole (the new folder is renamed into place at the end)")
    parser.add_argument("--dry-run", action="store_true", help="validate and list what would be written")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@one_line_errors("export_hf")
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_uni.convert.exporter import export_hf

    plan = export_hf(args.checkpoint, args.out_dir, tokenizer_dir=args.tokenizer, base_dir=args.base,
                     max_shard_bytes=int(args.shard_size * 2 ** 30), dtype=getattr(torch, args.dtype),
                     link=args.link, dry_run=args.dry_run, progress=not args.no_progress, overwrite=args.overwrite)
    verb = "would write" if args.dry_run else "wrote"
    print(f"{verb} {args.out_dir}:")
    print("\n".join("  " + line for line in plan.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
