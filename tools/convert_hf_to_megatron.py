#!/usr/bin/env python
"""Import an HF LLaDA2 folder (LLaDA2.0-mini text model, or a Uni export) into a torch_dist
checkpoint of the LLaDA2.0-Uni model at any TP/PP/EP layout.

Launch one process per rank of the TARGET layout; each rank builds its model shard, fills it
from the HF shards (streamed one file at a time) and all ranks save together:

    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py HF_DIR OUT_ROOT \\
        --recipe recipes/model/llada2_uni_16b.yaml --tp 2 --ep 4
    python tools/convert_hf_to_megatron.py HF_DIR OUT_ROOT --recipe ... --dry-run

Under TP the import turns on sequence parallel (megatron-core's MoE layers require it) and, with
EP 1, sets parallel.expert_tensor to the TP size; neither changes the written tensors, and an
``--override`` of either wins. The target is checked before anything is built (also under
--dry-run): an iteration already published there, or a root that cannot be written, is refused.

Text rows of the embedding and output layer are copied; image-code rows are drawn from
N(0, std^2) (std = model.init_method_std unless --image-init-std) with a fixed seed, so every
layout writes the same values; padding rows are zero. Any saved layout loads at any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_uni.config import load_config, validate_parallel
from megatron_uni.errors import one_line_errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="HF folder: config.json + model.safetensors(.index.json) shards")
    parser.add_argument("out_root", help="checkpoint root to write (iter_0000000/ and 'latest')")
    parser.add_argument("--recipe", required=True, help="model recipe YAML, e.g. recipes/model/llada2_uni_16b.yaml")
    parser.add_argument("--override", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe overrides, e.g. model.params_dtype=float32")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written layout")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the fresh image-code rows")
    parser.add_argument("--image-init-std", type=float, default=None,
                        help="std of the fresh image-code rows (default model.init_method_std)")
    parser.add_argument("--tokenizer", help="tokenizer directory recorded as the checkpoint's vocabulary")
    parser.add_argument("--iteration", type=int, default=0, help="iteration number of the written checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="validate and list what would be written; no model")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def layout_defaults(args):
    """Under TP: sequence parallel on (megatron-core's MoE layers require it) and, without EP, the
    experts split like the dense layers (our config requires it). Both change how a training step
    splits work, never the checkpoint's tensors; an ``--override`` of either wins."""
    if args.tp == 1:
        return []
    defaults = ["parallel.sequence_parallel=true"]
    if args.ep == 1:
        defaults.append(f"parallel.expert_tensor={args.tp}")
    return defaults


def resolve_config(args):
    """The recipe + overrides at the command line's layout."""
    layout = [f"parallel.tensor={args.tp}", f"parallel.pipeline={args.pp}", f"parallel.expert={args.ep}"]
    if args.vpp:
        layout.append(f"parallel.virtual_pipeline={args.vpp}")
    return load_config(args.recipe, layout_defaults(args) + list(args.override) + layout)


def check_layout(cfg, world_size: int) -> None:
    """The layout against the launched ranks. Not the recipe's batch sizes: an import runs no step."""
    validate_parallel(cfg.model, dataclasses.replace(cfg.parallel, world_size=world_size))


@one_line_errors("convert_hf_to_megatron")
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    from megatron_uni.convert import importer

    importer.check_target(args.out_root, args.iteration)
    if args.dry_run:
        print("\n".join(importer.dry_run_report(args.hf_dir, cfg.model)))
        return 0
    return _run(args, cfg, importer)


def _run(args, cfg, importer) -> int:
    import torch

    from megatron_uni.platform.distributed import destroy, init_distributed, is_rank0

    launch = init_distributed(cfg.parallel, seed=args.seed)
    check_layout(cfg, launch.world_size)
    vocabulary = None
    if args.tokenizer:
        from megatron_uni.tokens import Vocabulary

        vocabulary = Vocabulary.from_tokenizer_dir(args.tokenizer, text_size=cfg.model.text_vocab,
                                                   num_image_codes=cfg.model.num_image_codes)
    with torch.no_grad():
        iter_dir = importer.import_hf(args.hf_dir, cfg.model, cfg.parallel, args.out_root, seed=args.seed,
                                      image_init_std=args.image_init_std, iteration=args.iteration,
                                      vocabulary=vocabulary, progress=is_rank0() and not args.no_progress)
    if is_rank0():
        print(f"wrote {iter_dir}")
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
