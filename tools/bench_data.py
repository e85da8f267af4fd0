#!/usr/bin/env python
"""Benchmark of the row plan at corpus scale, on synthetic document lengths (no data files).

Two datasets (by default 20M documents of lognormal length, median 2000, and 10M of median 600, sigma 0.6,
blended 0.7 / 0.3) are planned into rows of 8192 (block 32, lookahead 8) in a fresh cache
directory, timed; then a new process opens the planned run and fetches the segments of row
``--fetch-row``, timed, with its memory beyond the memory-mapped plan (RssAnon). Rows beyond
``--rows`` are planned first when ``--fetch-row`` needs them (reported separately).

    python tools/bench_data.py                       # the issue's sizes: 10M rows, fetch row 50M
    python tools/bench_data.py --small               # 1/100 of the sizes, a few seconds
    python tools/bench_data.py --host-path           # fetch -> pack -> noise -> layout at L=8192, rows/s per worker

``--host-path`` builds the demo data set in a temporary directory and times the training
micro-batches (``MicrobatchSource``) of the demo recipe at ``--seq-length``: in-process (one
core, one torch thread: the cost of one worker) and with ``--workers`` worker processes.

Not a test: numbers depend on the machine; record them with the command in docs/benchmarks.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from megatron_uni.data.packing import PackingSettings
from megatron_uni.data.row_plan import PlanInputs, open_row_plan


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, nargs=2, default=[20_000_000, 10_000_000],
                   help="documents of the two datasets")
    p.add_argument("--medians", type=float, nargs=2, default=[2000, 600], help="median document lengths")
    p.add_argument("--weights", type=float, nargs=2, default=[0.7, 0.3], help="blend weights")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows to plan (timed)")
    p.add_argument("--fetch-row", type=int, default=50_000_000, help="row whose segments a new process fetches")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--lookahead", type=int, default=8)
    p.add_argument("--cache-dir", default=None, help="where the plan goes (default: a temporary directory)")
    p.add_argument("--small", action="store_true", help="divide documents, rows and fetch row by 100")
    p.add_argument("--fetch-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host-path", action="store_true", help="time the full micro-batch host path instead")
    p.add_argument("--micro-batch-size", type=int, default=4, help="--host-path: rows per micro-batch")
    p.add_argument("--microbatches", type=int, default=8, help="--host-path: micro-batches timed")
    p.add_argument("--workers", type=int, default=2, help="--host-path: worker processes of the second timing")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="--host-path: extra recipe overrides (e.g. diffusion.prefix_aware=true)")
    args = p.parse_args(argv)
    if args.small:
        args.documents = [n // 100 for n in args.documents]
        args.rows, args.fetch_row = args.rows // 100, args.fetch_row // 100
    return args


def synthetic_inputs(args) -> PlanInputs:
    rng = np.random.default_rng(0)
    lengths = [np.maximum(1, rng.lognormal(np.log(median), 0.6, n)).astype(np.int64)
               for n, median in zip(args.documents, args.medians)]
    packing = PackingSettings(args.seq_length, args.block_size, lookahead=args.lookahead)
    return PlanInputs(lengths, args.weights, 1234, packing, ["synthetic_a", "synthetic_b"])


def cpu_seconds() -> float:
    """CPU time of this process (user + system): the one-core cost when the machine is shared."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_mb() -> dict:
    """Resident memory now, split into anonymous (heap) and file-backed (mapped files) pages."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def fetch(args) -> dict:
    """In a fresh process: open the planned run and read one row's segments."""
    inputs = synthetic_inputs(args)
    before = memory_mb()
    start, cpu = time.perf_counter(), cpu_seconds()
    plan = open_row_plan(inputs, args.cache_dir, rows=args.fetch_row + 1)
    segments = plan.row(args.fetch_row)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    after = memory_mb()
    return {"open_and_fetch_s": round(seconds, 3), "open_and_fetch_cpu_s": round(cpu, 3), "segments": [(s.ref, s.start, s.end) for s in segments],
            "rss_anon_growth_mb": round(after["RssAnon"] - before["RssAnon"], 1),
            "rss_anon_mb": round(after["RssAnon"], 1), "rss_file_mb": round(after["RssFile"], 1),
            "synthetic_lengths_mb": round(sum(l.nbytes for l in inputs.lengths) / 2 ** 20, 1)}


def host_path_source(args, root: str, num_workers: int):
    """The demo recipe's micro-batch source over the demo data set at ``--seq-length``."""
    from megatron_uni.config import load_config
    from megatron_uni.training.batches import MicrobatchSource

    mbs = args.micro_batch_size
    iters = args.microbatches
    cfg = load_config("recipes/demo/tiny_cpu.yaml", [
        f"data.path={root}/dataset/demo", f"data.tokenizer={root}/tokenizer", f"data.seq_length={args.seq_length}",
        f"data.block_size={args.block_size}", f"data.micro_batch_size={mbs}", f"data.global_batch_size={mbs}",
        f"data.num_workers={num_workers}", f"schedule.train_iters={iters + 1}", *args.overrides])
    return MicrobatchSource(cfg)


def host_path(args) -> int:
    """Rows per second through fetch -> pack -> noise -> layout, in-process and with workers."""
    import torch

    from megatron_uni.data.build import BuildSettings, build_dataset
    from megatron_uni.data.demo import DEMO_IMAGE_CODES, make_demo_data

    root = tempfile.mkdtemp(prefix="bench_host_")
    make_demo_data(root, num_scenes=12, num_paragraphs=16, seed=0)
    build_dataset([os.path.join(root, "samples.jsonl")], os.path.join(root, "dataset", "demo"),
                  BuildSettings(os.path.join(root, "tokenizer"), os.path.join(root, "image_codes.json"),
                                num_image_codes=DEMO_IMAGE_CODES))
    torch.set_num_threads(1)
    rows = args.microbatches * args.micro_batch_size
    for workers in (0, args.workers):
        source = host_path_source(args, root, workers)
        source.build_microbatch(0, 0, 0, 1)  # plan the rows (cached on disk): not timed
        # timed from the first request: the workers' start-up counts against them
        start, cpu = time.perf_counter(), cpu_seconds()
        for iteration in range(args.microbatches):
            inputs = source(iteration, 0, 0, 1)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        cost = f", {rows / cpu:.1f} rows per CPU second" if workers == 0 else ""
        print(f"{workers} workers: {rows} rows of {args.seq_length} ({inputs.input_ids.shape[0]} x "
              f"{inputs.input_ids.shape[1]} model positions per micro-batch) in {seconds:.2f} s wall, {cpu:.2f} s CPU "
              f"in the training process: {rows / seconds:.1f} rows/s, {rows / seconds / max(1, workers):.1f} rows/s "
              f"per {'process' if workers == 0 else 'worker'}{cost}")
        source.close()
    print(f"   overrides: {args.overrides or 'none'}; loop process torch threads: 1; host cores: {os.cpu_count()}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.host_path:
        return host_path(args)
    if args.fetch_only:
        print(json.dumps(fetch(args)))
        return 0
    cache = args.cache_dir or tempfile.mkdtemp(prefix="bench_data_")
    start = time.perf_counter()
    inputs = synthetic_inputs(args)
    print(f"synthetic lengths: {sum(args.documents):,} documents in {time.perf_counter() - start:.1f} s")
    start, cpu = time.perf_counter(), cpu_seconds()
    plan = open_row_plan(inputs, cache, rows=args.rows)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    print(f"planned {plan.rows:,} rows in {seconds:.1f} s wall, {cpu:.1f} s CPU ({plan.rows / cpu:,.0f} rows per CPU s), "
          f"{os.path.getsize(plan.path) / 2 ** 30:.2f} GiB, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")
    print("  ", plan.stats.summary())
    if args.fetch_row >= plan.rows:
        start, cpu = time.perf_counter(), cpu_seconds()
        plan = open_row_plan(inputs, cache, rows=args.fetch_row + 1)
        print(f"extended the plan to {plan.rows:,} rows in {time.perf_counter() - start:.1f} s wall, "
              f"{cpu_seconds() - cpu:.1f} s CPU "
              f"({os.path.getsize(plan.path) / 2 ** 30:.2f} GiB), peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")
    del plan, inputs
    command = [sys.executable, os.path.abspath(__file__), "--fetch-only", "--cache-dir", cache] + \
        [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--fetch-only"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"new process: open the plan and fetch row {args.fetch_row:,} in {result['open_and_fetch_s']} s wall, "
          f"{result['open_and_fetch_cpu_s']} s CPU; "
          f"RssAnon grew {result['rss_anon_growth_mb']} MB (total {result['rss_anon_mb']} MB, of which "
          f"{result['synthetic_lengths_mb']} MB are the synthetic lengths), RssFile {result['rss_file_mb']} MB")
    print(f"   segments: {result['segments']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
