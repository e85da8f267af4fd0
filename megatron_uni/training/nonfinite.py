"""Steps whose loss or gradients are not finite are skipped, counted, and end the run when repeated.

A NaN/Inf loss (known on every rank after the global loss reduction) or any non-finite gradient
(checked on the DDP gradient buffers after ``finalize_model_grads``, flag all-reduced over the
world, so every rank decides alike) skips the optimizer step, the LR-schedule step (megatron-LM's
rule for an unsuccessful update) and the expert-bias update; the iteration still advances (its
data is consumed). ``optimizer.max_consecutive_skips`` skipped steps in a row raise
:class:`TrainingAborted` (the CLI prints it as one line and exits non-zero).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from megatron_uni import platform


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps: training cannot continue from here."""


def grads_finite(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """True when every gradient in every DDP buffer of every rank is finite."""
    finite = True
    for chunk in model_chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            finite = finite and bool(torch.isfinite(buffer.grad_data).all())
    flag = torch.tensor([0.0 if finite else 1.0], device=platform.device())  # the process group's device
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


class SkipCounter:
    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.in_a_row = 0
        self.total = 0

    def should_skip(self, loss: float, model_chunks: Sequence[torch.nn.Module]) -> bool:
        # always all-reduce the grad flag (every rank must join the collective)
        finite_grads = grads_finite(model_chunks)
        return not (math.isfinite(loss) and finite_grads)

    def update(self, skipped: bool, iteration: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            raise TrainingAborted(
                f"iteration {iteration}: {self.in_a_row} consecutive steps with a non-finite loss or gradient "
                f"(optimizer.max_consecutive_skips={self.max_consecutive}); stopping without saving -- resume "
                f"from the last checkpoint with a lower optimizer.lr or check the data at these iterations")
