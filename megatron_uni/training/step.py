"""One micro-batch through the model: megatron's ``forward_step_func`` for every PP schedule.

The data iterator yields :class:`~megatron_uni.diffusion.inputs.DiffusionInputs` (the BDLM
layout built by the diffusion step), built on the CPU; :func:`make_forward_step` moves it to
``platform.device()`` -- the one host-to-device copy of the training step. Every pipeline stage
reads the same micro-batch: positions and the attention layout are needed on all stages, labels
and loss weights on the last.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_uni import platform
from megatron_uni.diffusion.inputs import DiffusionInputs
from megatron_uni.diffusion.losses import loss_sums, schedule_loss
from megatron_uni.training.confidence import confidence_loss_func
from megatron_uni.training.metrics import token_stats


def loss_func(inputs: DiffusionInputs, weighting: str, per_token_ce: torch.Tensor):
    """megatron's 3-tuple ``(loss_sum, num_tokens, report)`` with ``calculate_per_token_loss=True``:
    the schedules add both over micro-batches and ``finalize_model_grads`` divides the gradients by
    the count all-reduced over data parallel -- one global normalisation, not a mean of means."""
    loss_sum, count, report = schedule_loss(loss_sums(per_token_ce, inputs), weighting)
    return loss_sum, count, {**report, "tokens": token_stats(per_token_ce, inputs)}


def make_forward_step(weighting: str, confidence_beta: float = 0.0):
    def forward_step(data_iterator, model):
        inputs: DiffusionInputs = next(data_iterator).to(platform.device(), non_blocking=True)
        if confidence_beta:  # CAP needs the logits, not megatron's per-token CE
            logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
            return logits, partial(confidence_loss_func, inputs, weighting, confidence_beta)
        output = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=inputs.model_labels)
        return output, partial(loss_func, inputs, weighting)

    return forward_step
