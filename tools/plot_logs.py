"""Plot training curves from one or several runs' ``metrics.jsonl`` (written by the training loop).

    python tools/plot_logs.py RUN_DIR [RUN_DIR ...] [--output curves.png]

Each RUN_DIR is a run directory holding ``metrics.jsonl`` (or the file itself). One PNG with four
panels, one line per run: loss splits (total, masked-token CE, text, image, special), throughput
(clean tokens/s), MFU (model TFLOP/s per device where MFU is n/a, e.g. on CPU), and expert load
(max/mean tokens per expert, worst MoE layer). Needs matplotlib (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

METRICS_FILE = "metrics.jsonl"
LOSS_KEYS = ("loss", "masked_ce", "text_loss", "image_loss", "special_loss", "valid/masked_ce")


def read_metrics(path: str) -> List[Dict]:
    """The records of one run (a run directory or a JSONL file); a resumed run's repeats keep the last."""
    file = path if path.endswith(".jsonl") else os.path.join(path, METRICS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} (is it a run directory of `megatron-uni train`?)")
    by_iteration = {}
    with open(file) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{file}:{number}: not JSON ({err.msg})") from None
                by_iteration[record["iteration"]] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def _series(records: List[Dict], key: str):
    points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None and r[key] == r[key]]
    return [p[0] for p in points], [p[1] for p in points]


def _worst_expert_load(records: List[Dict]) -> List[Dict]:
    out = []
    for r in records:
        ratios = [v for k, v in r.items() if k.endswith("/max_over_mean")]
        out.append({"iteration": r["iteration"], "expert_max_over_mean": max(ratios) if ratios else None})
    return out


def plot(runs: Dict[str, List[Dict]], output: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (loss_ax, tput_ax), (mfu_ax, expert_ax) = axes
    for name, records in runs.items():
        for key in LOSS_KEYS:
            xs, ys = _series(records, key)
            if xs:
                valid = key.startswith("valid/")  # only every eval.interval steps: marked points
                loss_ax.plot(xs, ys, label=f"{name}: {key}", linestyle="-" if key == "loss" else ":" if valid else "--",
                             marker="o" if valid else None)
        tput_ax.plot(*_series(records, "clean_tokens_per_s"), label=name)
        xs, ys = _series(records, "mfu")
        if xs:
            mfu_ax.plot(xs, [100 * y for y in ys], label=f"{name}: MFU %")
        else:
            mfu_ax.plot(*_series(records, "model_tflops_per_device"), label=f"{name}: TFLOP/s per device")
        expert_ax.plot(*_series(_worst_expert_load(records), "expert_max_over_mean"), label=name)
    titles = ("loss", "clean (loss-bearing) tokens / s", "MFU % (TFLOP/s per device where n/a)",
              "expert load: max / mean tokens per expert (worst layer)")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl) or JSONL files")
    parser.add_argument("--output", default="training_curves.png", help="PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_logs: matplotlib is not installed (pip install -e '.[test]')", file=sys.stderr)
        return 2
    try:
        runs = {os.path.basename(os.path.normpath(path)) or path: read_metrics(path) for path in args.runs}
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_logs: {err}", file=sys.stderr)
        return 2
    print(plot(runs, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
