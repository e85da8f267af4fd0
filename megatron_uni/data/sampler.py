"""Which packed rows a micro-batch reads.

A run's packed rows form one sequence, a pure function of (datasets, weights, seed, packing
settings) planned once (:mod:`megatron_uni.data.row_plan`). Iteration ``i`` consumes rows
``[i * global_batch, (i + 1) * global_batch)``; inside it, micro-batch ``k`` of data-parallel rank
``r`` (of ``w``) reads the ``micro_batch`` rows starting at ``(k * w + r) * micro_batch``. Ranks are
disjoint and together cover every row once, and the rows of an iteration are the same set at
any data-parallel size, so resuming needs nothing but the iteration.

:func:`microbatch_plan` is the ONE place that answers "which rows does micro-batch k of
iteration i on DP rank r read"; the noise of each row is keyed by its global row index
(``diffusion.noising.RowKeys``), so rows and noise together do not depend on the layout.
"""

from __future__ import annotations

from typing import List


def microbatch_plan(iteration: int, microbatch: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                    global_batch_size: int) -> List[int]:
    """Row indices of micro-batch ``microbatch`` of ``iteration`` on data-parallel rank ``dp_rank``."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} outside world of {dp_size}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} "
                         f"x data-parallel size {dp_size}")
    if not 0 <= microbatch < global_batch_size // (micro_batch_size * dp_size):
        raise ValueError(f"micro-batch {microbatch} outside the {global_batch_size // (micro_batch_size * dp_size)} "
                         f"of an iteration")
    first = iteration * global_batch_size + (microbatch * dp_size + dp_rank) * micro_batch_size
    return list(range(first, first + micro_batch_size))


# the name the loader and earlier callers use
microbatch_rows = microbatch_plan
