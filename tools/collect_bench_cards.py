"""Cards written by tools/bench_throughput.py -> one markdown table (one row per card).

    python tools/collect_bench_cards.py [CARD.json | DIR ...]    (default: docs/benchmarks/)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("| recipe | device | GPUs | TP | PP | EP | mbs | rows | loss tok/s/GPU | positions/s/GPU | TFLOP/s/GPU "
          "| MFU | peak GiB | max/mean expert load | vs dFactory | commit |")


def read_cards(paths: List[str]) -> List[Dict]:
    files: List[str] = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
    cards = []
    for name in files:
        with open(name) as f:
            try:
                cards.append(json.load(f))
            except json.JSONDecodeError as err:
                raise SystemExit(f"{name}: not a benchmark card ({err})")
        if "ours" not in cards[-1] or "layout" not in cards[-1]:
            raise SystemExit(f"{name}: not a benchmark card (no 'ours' / 'layout')")
    return cards


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def row(card: Dict) -> str:
    ours, layout = card["ours"], card["layout"]
    tokens = ours["tokens_per_s_per_gpu"]
    loads = [layer["max_over_mean"] for layer in ours.get("routing", {}).get("layers", [])]
    speedup = card.get("speedup_loss_tokens_vs_dfactory")
    return (f"| {card['recipe']} | {card['device']['name']} | {card['device'].get('count')} | {layout['tensor']} "
            f"| {layout['pipeline']} | {layout['expert']} | {layout['micro_batch']} | {layout['rows']} "
            f"| {_num(tokens['loss_tokens'], ',.0f')} | {_num(tokens['positions'], ',.0f')} "
            f"| {_num(ours['model_tflops_per_gpu'], '.4g')} | {_num(ours.get('mfu'), '.1%')} "
            f"| {_num(ours['peak_memory_gib'], '.1f')} | {_num(max(loads) if loads else None, '.2f')} "
            f"| {_num(speedup, '.2f') + ('x' if speedup else '')} | {card['commit']} |")


def table(cards: List[Dict]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    return "\n".join(lines + [row(card) for card in cards])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=[os.path.join(REPO, "docs", "benchmarks")],
                        help="card files or directories of cards (default docs/benchmarks/)")
    args = parser.parse_args(argv)
    print(table(read_cards(args.paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
