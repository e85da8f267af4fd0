"""Has a training run reached its end? Used by slurm/launch.sh after the step to decide on requeue.

    python slurm/run_state.py RECIPE [section.key=value ...]

Resolves the recipe like ``megatron-uni train`` and reads ``checkpoint.save/latest``. Prints one
line and exits 0 when the latest checkpoint is at ``schedule.train_iters`` (finished), 3 when it
is not (or nothing was saved yet: unfinished, a requeue resumes), 4 when the recipe saves no
checkpoint (a requeue could not resume), 2 on a bad recipe.
"""

import os
import re
import sys

from megatron_uni.config import ConfigError, load_config

FINISHED, UNFINISHED, NO_CHECKPOINT, BAD_RECIPE = 0, 3, 4, 2


def latest_iteration(root: str) -> int:
    """Iteration named by ``root/latest`` (the last complete checkpoint), -1 when there is none."""
    try:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return -1
    match = re.fullmatch(r"iter_(\d{7})", name)
    return int(match.group(1)) if match else -1


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return BAD_RECIPE if not argv else 0
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"run_state: config error: {err}")
        return BAD_RECIPE
    if not cfg.checkpoint.save:
        print("run_state: checkpoint.save is not set: a requeued job could not resume")
        return NO_CHECKPOINT
    latest = latest_iteration(cfg.checkpoint.save)
    done = latest >= cfg.schedule.train_iters
    print(f"run_state: {cfg.checkpoint.save}: latest iteration {latest if latest >= 0 else 'none'} "
          f"of {cfg.schedule.train_iters} -> {'finished' if done else 'unfinished'}")
    return FINISHED if done else UNFINISHED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
