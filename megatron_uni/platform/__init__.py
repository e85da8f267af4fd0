"""The platform layer: which device this process computes on, and the CPU stand-ins for CUDA.

:func:`device` is the one place the training code asks for a device: model inputs are moved
there (``DiffusionInputs.to``) and every collective our code issues allocates its tensor there,
so under NCCL they are CUDA tensors and under gloo on a CPU machine CPU tensors. Never write a
device literal elsewhere; tests monkeypatch this function to check the step goes through it.
"""

from __future__ import annotations

import torch


def device() -> torch.device:
    """The current CUDA device when CUDA is available (``init_distributed`` selected it from the
    local rank), else the CPU -- also the device of the process group's collectives (NCCL with
    CUDA, gloo without; see ``launch.backend``)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
