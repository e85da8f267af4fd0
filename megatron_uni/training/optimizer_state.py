"""Optimizer state that resumes exactly: the distributed optimizer over torch Adam, and the layout rule.

megatron-core 0.16.1's ``DistributedOptimizer`` loads a checkpoint into torch's Adam/AdamW (the
CPU fallback, and GPU runs without TE/apex) with two defects we work around here, never by editing
megatron:

1. ``sharded_state_dict(is_loading=True)`` starts with ``self.state_dict()``, which asserts on
   exactly one ``step`` value over torch Adam's per-parameter state (distrib_optimizer.py:642).
   A fresh optimizer has no state yet, so every resume crashed. :func:`allocate_adam_state`
   creates the state torch Adam would create lazily at its first step (zero moments, step 0).
2. After loading, every parameter's ``step`` is ONE shared tensor (distrib_optimizer.py:818-825)
   that the ``dp_reshardable`` parameter-state load then overwrites with the pre-load local value
   (``step`` is a ``LocalNonpersistentObject``, :1664-1667, copied at :940). torch Adam then adds
   1 per parameter to the shared tensor per step. :func:`restore_adam_step` gives every parameter
   its own tensor holding the checkpoint's step (kept by torch in ``param_groups[i]["step"]``).

TE's FusedAdam keeps ``step`` in its param groups and is unaffected; both functions skip it.

The ``dp_reshardable`` format reshards over data parallelism only. :func:`check_resume_layout`
refuses a TP/PP/VPP/CP/EP/expert-TP change (or switching the distributed optimizer on or off) at
load time with one line naming both layouts, instead of megatron's KeyError deep in the load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch

from megatron_uni.checkpoint import CheckpointError

# the parallel keys that fix the distributed optimizer's buckets (data parallelism may change)
LAYOUT_KEYS = ("tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor",
               "distributed_optimizer")


class ResumeLayoutError(CheckpointError):
    """The checkpoint's optimizer state cannot be loaded under the configured parallel layout."""


def _torch_adams_of_distributed_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch Adam/AdamW inside every DistributedOptimizer of a (chained) megatron optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(member, "optimizer", None)
        if isinstance(member, DistributedOptimizer) and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def allocate_adam_state(optimizer) -> None:
    """Give torch Adam the per-parameter state its first ``step()`` would create, where it has none.

    Zero moments and step 0: exactly torch's lazy initialisation, so nothing changes numerically;
    the checkpoint load then copies the saved values into these tensors."""
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if adam.state.get(param):
                    continue
                state = {"step": torch.tensor(0.0, dtype=torch.float32),
                         "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                adam.state[param] = state


def restore_adam_step(optimizer) -> None:
    """After a load: one ``step`` tensor per parameter, equal to the checkpoint's step."""
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            if "step" not in group:  # nothing loaded into this group
                continue
            for param in group["params"]:
                if param in adam.state:
                    device = adam.state[param]["step"].device
                    adam.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                             device=device)


def _layout(parallel: Any) -> dict:
    values = dataclasses.asdict(parallel) if dataclasses.is_dataclass(parallel) else dict(parallel or {})
    return {key: values.get(key) for key in LAYOUT_KEYS}


def _describe(layout: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={layout[key]}" for key in LAYOUT_KEYS)


def check_resume_layout(saved_parallel: Any, parallel: Any, checkpoint_dir: str) -> None:
    """Refuse to load optimizer state saved under another model-parallel layout (DP may differ)."""
    saved, wanted = _layout(saved_parallel), _layout(parallel)
    if not (saved["distributed_optimizer"] or wanted["distributed_optimizer"]) or saved == wanted:
        return  # the plain optimizer's state is keyed like the model's and reshards freely
    raise ResumeLayoutError(
        f"{checkpoint_dir}: optimizer state saved under parallel layout [{_describe(saved)}] cannot be "
        f"resumed under [{_describe(wanted)}] (the distributed optimizer reshards over data parallelism "
        f"only); keep the layout, or load the weights alone with checkpoint.finetune=true")
