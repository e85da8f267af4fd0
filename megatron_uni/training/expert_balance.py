"""Aux-loss-free expert balancing as Ling trained it, and the per-layer expert load for the log.

megatron-core updates every router's ``expert_bias`` inside ``finalize_model_grads``, i.e. before
the optimizer step says whether the step is applied, and only with the plain sign rule
``bias += rate * sign(mean - count)``, whose mean over experts drifts (it is not zero whenever
the number of under- and over-loaded experts differ). :class:`ExpertBalance` replaces that
update, without editing megatron:

- its :meth:`ExpertBalance.finalize_model_grads` runs megatron's ``finalize_model_grads`` with the
  config's ``moe_router_enable_expert_bias`` switched off for the call (megatron then neither
  updates the bias nor zeroes the routers' token counts);
- after the optimizer step, :meth:`ExpertBalance.after_step` all-reduces the counts over
  TP x CP x DP (as megatron does), records the load, applies the update only if the step was
  applied, and zeroes the counts. With ``model.moe_router_bias_zero_mean`` (default) the update is
  Ling-V2's ``--bias-zero-mean-update``::

      delta = sign(mean - count);  bias += rate * (delta - mean_e(delta))

  which keeps the mean bias at exactly its initial value (0). ``model.moe_router_bias_update_rate: 0``
  freezes the bias (dFactory's SFT setting).

The counts are the routers' own: every routed position of the computed ``[noisy | clean]`` row
(megatron counts every token the router sees; row padding included).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.utils import get_model_config

# an expert below this fraction of the mean load counts as starved in the log
STARVED_FRACTION = 0.1


def zero_mean_bias_update(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor, rate: float,
                          zero_mean: bool = True) -> torch.Tensor:
    """The updated ``[layers, experts]`` bias from the global ``[layers, experts]`` counts."""
    counts = tokens_per_expert.float()
    delta = torch.sign(counts.mean(-1, keepdim=True) - counts)
    if zero_mean:
        delta = delta - delta.mean(-1, keepdim=True)
    return expert_bias + rate * delta


def expert_load(tokens_per_expert: torch.Tensor) -> Dict[str, List[float]]:
    """Per layer: max/mean tokens per expert and the fraction of experts below 10% of the mean."""
    counts = tokens_per_expert.float()
    mean = counts.mean(-1).clamp_min(1e-12)
    return {"max_over_mean": (counts.max(-1).values / mean).tolist(),
            "starved_fraction": (counts < STARVED_FRACTION * mean.unsqueeze(-1)).float().mean(-1).tolist()}


class ExpertBalance:
    """Owns the expert-bias update of every router of this rank's model chunks."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], rate: float, zero_mean: bool = True) -> None:
        self.routers = [module for chunk in model_chunks for module in chunk.modules()
                        if getattr(module, "expert_bias", None) is not None]
        self.rate = rate
        self.zero_mean = zero_mean

    @property
    def layer_numbers(self) -> List[int]:
        return [router.layer_number for router in self.routers]

    def finalize_model_grads(self, model, num_tokens=None, *args, **kwargs):
        """megatron's ``finalize_model_grads`` minus its expert-bias update (done in :meth:`after_step`)."""
        config = get_model_config(model[0])
        enabled = config.moe_router_enable_expert_bias
        config.moe_router_enable_expert_bias = False
        try:
            return finalize_model_grads(model, num_tokens, *args, **kwargs)
        finally:
            config.moe_router_enable_expert_bias = enabled

    @torch.no_grad()
    def after_step(self, applied: bool) -> Optional[Dict[str, List[float]]]:
        """Global counts -> load report; bias update only when the optimizer step was ``applied``."""
        if not self.routers:
            return None
        counts = torch.stack([router.local_tokens_per_expert for router in self.routers]).float()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(
                counts, group=parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True))
        if applied and self.rate:
            biases = torch.stack([router.expert_bias for router in self.routers])
            updated = zero_mean_bias_update(counts, biases, self.rate, self.zero_mean)
            for router, bias in zip(self.routers, updated):
                router.expert_bias.copy_(bias)
        for router in self.routers:
            router.local_tokens_per_expert.zero_()
        return {"layers": self.layer_numbers, **expert_load(counts)}
