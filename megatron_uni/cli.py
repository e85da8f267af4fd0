"""``megatron-uni``: the command line of megatron_uni.

    megatron-uni info  RECIPE [section.key=value ...]   resolved config, parameter counts, layout
    megatron-uni train RECIPE [section.key=value ...]   train (single process, torchrun, srun, mpirun)
    megatron-uni generate MODEL TASK ...               text / image / edit / understand (docs/inference.md)
    megatron-uni bench RECIPE [overrides] [--baseline]  throughput card (tools/bench_throughput.py, a checkout)

Recipes are YAML files (see recipes/); overrides use dotted keys, e.g. ``optimizer.lr=1e-4``.
The offline tools (dataset building, image tokenization, HF conversion, benchmarks) live in
``tools/``: each has ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import List, Optional

from megatron_uni.config import Config, ConfigError, data_parallel_size, load_config
from megatron_uni.errors import MegatronUniError


def _format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def describe(cfg: Config) -> str:
    from megatron_uni.model.params import count_parameters

    counts = count_parameters(cfg.model)
    p = cfg.parallel
    lines = [
        "resolved config:",
        json.dumps(cfg.to_dict(), indent=2, sort_keys=False),
        f"parameters: {_format_count(counts.total)} total / {_format_count(counts.active)} active "
        f"({counts.total:,} / {counts.active:,})",
        f"  embeddings (input + output) {counts.embedding:,}; attention {counts.attention:,}; "
        f"dense FFN {counts.dense_mlp:,}; routed experts {counts.experts:,}",
        f"vocabulary: {cfg.model.text_vocab:,} text + {cfg.model.num_image_codes:,} image codes = "
        f"{cfg.model.vocab:,} model rows (padded to a multiple of 128)",
        f"parallel layout: TP {p.tensor} x PP {p.pipeline}"
        + (f" (VPP {p.virtual_pipeline})" if p.virtual_pipeline else "")
        + f" x CP {p.context}; EP {p.expert} (expert-TP {p.expert_tensor}); SP {p.sequence_parallel}; "
        + f"distributed optimizer {p.distributed_optimizer}",
    ]
    if p.world_size:
        lines.append(f"  world size {p.world_size} -> data parallel {data_parallel_size(p)}")
    else:
        lines.append("  world size: taken from the launcher (set parallel.world_size=N to check a layout)")
    return "\n".join(lines)


def cmd_info(args) -> int:
    cfg = load_config(args.recipe, args.overrides)
    print(describe(cfg))
    return 0


def _quiet_megatron(level: str) -> None:
    """Our log at ``logging.level``; megatron-core's INFO chatter (every param name) only at DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("megatron.core").setLevel(logging.WARNING)
        # expected on CPU: we never install apex, and TE is the GPU extra
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def cmd_train(args) -> int:
    from megatron_uni.training.stop import install_stop_handlers

    install_stop_handlers()  # first: a SIGUSR1/SIGTERM during set-up must not kill the process
    cfg = load_config(args.recipe, args.overrides)
    _quiet_megatron(cfg.logging.level)
    from megatron_uni.platform.distributed import destroy, is_rank0
    from megatron_uni.training import loop
    from megatron_uni.training.batches import MicrobatchSource

    logging.getLogger("megatron_uni.train").info("setting up %s", args.recipe)
    try:
        source = MicrobatchSource(cfg)
        state = loop.setup(cfg, vocabulary=source.vocab.layout())
        if is_rank0():
            print(f"training {args.recipe}: {cfg.schedule.train_iters} iterations from iteration {state.iteration}, "
                  f"world size {cfg.parallel.world_size}", flush=True)
            print(source.loader.packing_summary(), flush=True)
        validate = None
        if cfg.eval.interval:
            from megatron_uni.training.validation import Validation

            validate = Validation(cfg, source.model_seq_length)
        loop.run(state, source, source.model_seq_length, log_fn=lambda line: print(line, flush=True),
                 validate=validate)
    finally:
        destroy()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-uni", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("info", cmd_info, "print the resolved config, parameter counts (total/active) and the parallel layout"),
        ("train", cmd_train, "train with a recipe; resumes from checkpoint.save when it holds a checkpoint"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="YAML recipe (e.g. recipes/model/llada2_uni_16b.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides section.key=value (e.g. optimizer.lr=1e-4)")
        p.set_defaults(func=func)
    # parsed by megatron_uni.inference.command (see main); listed here for --help
    sub.add_parser("generate", add_help=False, help="generate text or image codes from an HF folder or a checkpoint")
    sub.add_parser("bench", add_help=False, help="throughput benchmark card: tools/bench_throughput.py (see its --help)")
    return parser


def _bench(argv: List[str]) -> int:
    """``tools/bench_throughput.py`` of the checkout this package runs from (tools/ is not installed)."""
    import os
    import runpy

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_throughput.py")
    if not os.path.isfile(tool):
        print(f"megatron-uni bench: {tool} not found (the benchmark runs from a repository checkout)", file=sys.stderr)
        return 2
    return runpy.run_path(tool, run_name="bench_throughput")["main"](argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        from megatron_uni.inference.command import main as generate_main

        return generate_main(argv[1:])
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    from megatron_uni.checkpoint import CheckpointError
    from megatron_uni.training.nonfinite import TrainingAborted
    from megatron_uni.training.stop import EXIT_STOPPED_IN_SETUP, StoppedBeforeTraining

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"megatron-uni: config error: {err}", file=sys.stderr)
        return 2
    except MegatronUniError as err:  # bad data, checkpoint or vocabulary: one line, no traceback
        print(f"megatron-uni: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # a recipe pointing at data, tokenizer or checkpoint that is not there
        print(f"megatron-uni: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # e.g. a resume under a layout the optimizer state cannot take
        print(f"megatron-uni: checkpoint error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        print(f"megatron-uni: training aborted: {err}", file=sys.stderr)
        return 3
    except StoppedBeforeTraining as err:  # SIGUSR1/SIGTERM during set-up (training/stop.py)
        print(f"megatron-uni: {err}", file=sys.stderr)
        return EXIT_STOPPED_IN_SETUP


if __name__ == "__main__":
    sys.exit(main())
