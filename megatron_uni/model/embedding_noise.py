"""Gaussian noise on the embeddings of mask tokens early in training (the LLaDA2 stability fix).

A forward hook on megatron's embedding module: the model's input changes, the loss does not, so
it lives beside the model rather than with the losses.
"""

from __future__ import annotations

from typing import Callable

import torch


def mask_embedding_noise_hook(mask_id: int, std: float, num_steps: int,
                              current_step: Callable[[], int], sequence_parallel_rank: int = 0):
    """Forward hook for ``model.embedding`` adding N(0, std^2) to embeddings of mask tokens.

    Active while ``current_step() < num_steps`` (the LLaDA2 fix for a near-zero mask embedding
    of an AR initialisation). Register with
    ``model.embedding.register_forward_hook(hook, with_kwargs=True)``. Megatron's embedding
    output is ``[s, b, h]``, scattered along s under sequence parallel: the full noise is drawn
    from the default generator (identical on TP ranks) and this rank's slice taken.
    """
    def hook(module, args, kwargs, output):
        if not module.training or current_step() >= num_steps or std <= 0:  # evaluation: no noise
            return output
        input_ids = args[0] if args else kwargs["input_ids"]
        is_mask = (input_ids == mask_id).transpose(0, 1).unsqueeze(-1)  # [s, b, 1]
        full = torch.randn(is_mask.shape[0], is_mask.shape[1], output.shape[-1],
                           device=output.device, dtype=output.dtype) * std
        noise = torch.where(is_mask, full, torch.zeros_like(full))
        local = output.shape[0]
        noise = noise[sequence_parallel_rank * local:(sequence_parallel_rank + 1) * local]
        return output + noise

    return hook
