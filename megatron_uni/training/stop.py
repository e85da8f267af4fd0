"""The stop flag: SIGTERM / SIGUSR1 (Slurm's pre-emption warning) ask the run to stop cleanly.

``megatron-uni train`` installs the handlers first thing, before the model is built or a
checkpoint is loaded, so a signal during set-up is recorded instead of killing the process
(Python's default for SIGUSR1 is to terminate: measured exit 138 under Slurm). The loop checks
the flag once per step on every rank (all-reduced) and once before the first step:

- raised during a step: save at the end of the step, exit 0;
- raised during set-up: raise :class:`StoppedBeforeTraining` -- nothing was trained, so nothing
  is saved (a resumed state is the checkpoint it was loaded from; a fresh one is reproduced from
  the seed) and the CLI exits with :data:`EXIT_STOPPED_IN_SETUP`.

Light on purpose (no torch/megatron import at module level): it is imported before them.
"""

from __future__ import annotations

import signal
from typing import Optional

EXIT_STOPPED_IN_SETUP = 75  # sysexits EX_TEMPFAIL: stopped before training; run again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedBeforeTraining(RuntimeError):
    """A stop signal arrived during set-up: the run ends before its first step, saving nothing."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1; :meth:`any_rank` is True when any rank's flag is set."""

    def __init__(self) -> None:
        self.raised = False
        self.signal_name: Optional[str] = None
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handler(self, signum, frame) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def any_rank(self) -> bool:
        import torch

        from megatron_uni import platform

        flag = torch.tensor([1 if self.raised else 0], dtype=torch.int, device=platform.device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


_installed: Optional[StopFlag] = None


def install_stop_handlers() -> StopFlag:
    """The process's stop flag, its handlers installed on the first call (idempotent)."""
    global _installed
    if _installed is None:
        _installed = StopFlag()
    return _installed


def reset_stop_flag() -> None:
    """Lower the flag after the run acted on it (a later run in the same process starts clean)."""
    if _installed is not None:
        _installed.raised = False
